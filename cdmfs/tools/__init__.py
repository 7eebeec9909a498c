"""The commands: cli (``cdmfs``), report (numactl/numastat layouts), bench and
its pyfuse3 floor, demo.  They use the mount through its files (the client).
"""
