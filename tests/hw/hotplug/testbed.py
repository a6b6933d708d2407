"""A umockdev testbed through ctypes (libumockdev.so.0 from Debian's ``umockdev`` package).

umockdev fakes ``/sys``, ``/dev`` and udev's netlink socket for a process started under
``umockdev-wrapper`` (which only sets ``LD_PRELOAD``). The GObject-introspection route needs
PyGObject, which a pip venv has to build (appliance.md §3.4); these five C calls need nothing.
Devices are added from umockdev's record format (``tests/hw/hotplug/devices.py``): adding one
sends "add" to listening monitors; :meth:`unplug` and :meth:`replug` send the uevents of a
pull and a re-insertion; tty devices get a pty behind their node, whose master end
:meth:`Testbed.master_fd` returns, so a serial port can be fed like the real adapter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil

from tests.hw.hotplug.devices import parse

LIBRARY = "libumockdev.so.0"


def available() -> str | None:
    """Why umockdev cannot be used here, or ``None`` when it can."""
    if shutil.which("umockdev-wrapper") is None:
        return "umockdev-wrapper not found (apt-get install umockdev)"
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return f"{LIBRARY} not found (apt-get install umockdev)"
    return None


def under_wrapper() -> bool:
    return "libumockdev-preload" in os.environ.get("LD_PRELOAD", "")


class Testbed:
    """A umockdev testbed; ``close()`` removes its directory."""

    def __init__(self) -> None:
        if not under_wrapper():
            raise RuntimeError("run this process under umockdev-wrapper")
        lib = ctypes.CDLL(LIBRARY)
        glib = ctypes.CDLL("libglib-2.0.so.0")
        gobject = ctypes.CDLL("libgobject-2.0.so.0")
        lib.umockdev_testbed_new.restype = ctypes.c_void_p
        lib.umockdev_testbed_get_root_dir.argtypes = [ctypes.c_void_p]
        lib.umockdev_testbed_get_root_dir.restype = ctypes.c_void_p
        lib.umockdev_testbed_add_from_string.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        lib.umockdev_testbed_add_from_string.restype = ctypes.c_int
        lib.umockdev_testbed_uevent.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.umockdev_testbed_remove_device.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.umockdev_testbed_get_dev_fd.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.umockdev_testbed_get_dev_fd.restype = ctypes.c_int
        glib.g_free.argtypes = [ctypes.c_void_p]
        gobject.g_object_unref.argtypes = [ctypes.c_void_p]
        self._lib, self._glib, self._gobject = lib, glib, gobject
        self._bed: int | None = lib.umockdev_testbed_new()
        raw = lib.umockdev_testbed_get_root_dir(self._bed)
        self.root = ctypes.string_at(raw).decode()
        glib.g_free(raw)

    def add(self, record: str) -> str:
        """Add the devices of a record (parents first); returns the tty's sys path. The add
        itself sends an "add" uevent for each device (a second ``uevent`` would repeat it)."""
        if not self._lib.umockdev_testbed_add_from_string(self._bed, record.encode(), None):
            raise RuntimeError("umockdev rejected the record")
        return parse(record)[-1].sys_path

    def unplug(self, record: str) -> None:
        """"remove" for the tty and then its parents, as the kernel sends them on an unplug.
        The devices stay in the testbed (umockdev 0.17's ``remove_device`` leaves the node's
        pty and links behind, and adding the device again then aborts), so :meth:`replug`
        can announce them again."""
        for device in reversed(parse(record)):
            self.uevent(device.sys_path, "remove")

    def replug(self, record: str) -> None:
        """"add" for the parents and then the tty."""
        for device in parse(record):
            self.uevent(device.sys_path, "add")

    def uevent(self, sys_path: str, action: str) -> None:
        self._lib.umockdev_testbed_uevent(self._bed, sys_path.encode(), action.encode())

    def master_fd(self, dev_node: str) -> int:
        """The pty master behind an emulated tty node (write here = the device sends)."""
        fd: int = self._lib.umockdev_testbed_get_dev_fd(self._bed, dev_node.encode())
        if fd < 0:
            raise RuntimeError(f"no emulated device node {dev_node}")
        return fd

    def close(self) -> None:
        if self._bed is not None:
            self._gobject.g_object_unref(self._bed)
            self._bed = None
