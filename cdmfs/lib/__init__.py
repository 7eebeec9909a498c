"""What every layer may use: bitmaps as the kernel prints them (node and cpu
lists), cond_resched(), and the event path every mover reports to.
"""
