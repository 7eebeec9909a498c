"""What the driver core gives every registered device directory: ``uevent``
(drivers/base/core.c, ``device_add()``) and ``power/`` (drivers/base/power/
sysfs.c, ``dpm_sysfs_add()``), as a device without runtime PM shows them.

Nothing here has an effect on the emulated machine: a synthetic uevent has
no netlink listener to reach, and power management has nothing to suspend.
The files are there because tools walk them and read them, and reads and
writes answer as the kernel's do.
"""
from __future__ import annotations

import errno
import re

from .. import formats
from ..tree import Attr, Dir, Tree

#: kobject_actions[] (lib/kobject_uevent.c), the words a uevent write takes.
UEVENT_ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SYNTH_ARG = re.compile(r"[A-Za-z0-9]+=\S*")


def uevent_show() -> str:
    """``uevent_show()``: the device's uevent variables.  A node, an access
    class or the node subsystem's root has no devt, type, driver or bus
    uevent callback: nothing (the host's node0/uevent reads empty too)."""
    return ""


def uevent_store(text: str) -> None:
    """``uevent_store()`` -> ``kobject_synth_uevent()``: ``ACTION [UUID
    [KEY=VALUE ...]]`` with one trailing newline at most; anything else is
    EINVAL.  A well-formed write is accepted and goes nowhere."""
    body = text[:-1] if text.endswith(("\n", "\0")) else text
    action, sep, args = body.partition(" ")
    if action not in UEVENT_ACTIONS:
        raise ValueError(f"uevent: unknown action {action!r}")
    if not sep:
        return
    uuid, _, rest = args.partition(" ")
    if not _UUID.fullmatch(uuid) or any(not _SYNTH_ARG.fullmatch(w) for w in rest.split(" ") if rest):
        raise ValueError("uevent: expected ACTION [UUID [KEY=VALUE ...]]")


def sysfs_streq(text: str, word: str) -> bool:
    """``sysfs_streq()``: equal but for one trailing newline on the write."""
    return text == word or text == word + "\n"


class Power:
    """``power/`` of a device whose runtime PM is disabled (the state every
    node device is in): ``control`` remembers auto/on, the status reads
    ``unsupported`` and no time is ever spent suspended or active."""

    def __init__(self) -> None:
        self.runtime_auto = True

    def control_show(self) -> str:
        return "auto\n" if self.runtime_auto else "on\n"

    def control_store(self, text: str) -> None:
        """``control_store()``: ``auto`` allows runtime PM, ``on`` forbids it."""
        if sysfs_streq(text, "auto"):
            self.runtime_auto = True
        elif sysfs_streq(text, "on"):
            self.runtime_auto = False
        else:
            raise ValueError("expected auto or on")

    @staticmethod
    def autosuspend_delay_ms(*_: object) -> str:
        """``autosuspend_delay_ms_show()``/``_store()``: EIO unless the driver
        uses autosuspend, which no node does."""
        raise OSError(errno.EIO, "the device does not use autosuspend")


def add_power(tree: Tree, d: Dir) -> Dir:
    """``power/`` as dpm_sysfs_add() makes it for a device without runtime PM
    callbacks of its own: the host's node0/power has these five files."""
    pm = Power()
    p = tree.add(d, "power", Dir())
    tree.add(p, "autosuspend_delay_ms", Attr(pm.autosuspend_delay_ms, pm.autosuspend_delay_ms))
    tree.add(p, "control", Attr(pm.control_show, pm.control_store))
    tree.add(p, "runtime_active_time", Attr(lambda: formats.ulong(0)))
    tree.add(p, "runtime_status", Attr(lambda: "unsupported\n"))
    tree.add(p, "runtime_suspended_time", Attr(lambda: formats.ulong(0)))
    return p


def add_device_files(tree: Tree, d: Dir) -> None:
    """``uevent`` and ``power/`` of a device directory."""
    tree.add(d, "uevent", Attr(uevent_show, uevent_store))
    add_power(tree, d)


def add_bus(tree: Tree, name: str) -> Dir:
    """``sys/bus/NAME/`` as bus_register() makes it for a bus without
    drivers (node): devices/, drivers/, drivers_autoprobe, drivers_probe and
    uevent.  Returns devices/."""
    bus = tree.path(f"sys/bus/{name}")
    devices = tree.dir(bus, "devices")
    tree.dir(bus, "drivers")
    autoprobe = [True]

    def autoprobe_store(text: str) -> None:
        # drivers_autoprobe_store(): '0' first turns it off, anything else on.
        autoprobe[0] = not text.startswith("0")

    def probe_store(text: str) -> None:
        # drivers_probe_store(): a device of the bus by name, or ENODEV; with
        # no driver to bind, probing it succeeds and does nothing.
        if not any(sysfs_streq(text, dev) for dev in devices.children):
            raise OSError(errno.ENODEV, f"no device {text.strip()!r} on bus {name}")

    tree.add(bus, "drivers_autoprobe", Attr(lambda: f"{int(autoprobe[0])}\n", autoprobe_store))
    tree.add(bus, "drivers_probe", Attr(None, probe_store))
    tree.add(bus, "uevent", Attr(None, uevent_store))
    return devices
