"""A built gateway image booted under qemu (TCG), reached from the host over SSH.

qemu's user-mode network with ``restrict=on``: the guest reaches nothing, the host reaches the
guest only through the forwarded ports on a loopback address (``GUEST_ADDRESS``), and the
guest reaches the host only through ``guestfwd`` rules: a connection to a virtual address of
the user network (``10.0.2.100:8883``) runs ``socat`` on the host, which dials a loopback
address there (the upstream hub of the boot test).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
GUEST_ADDRESS = os.environ.get("GATEWAY_GUEST_ADDRESS", "127.0.24.1")  # host side of hostfwd
BOOT_OFFSET = 1 * MIB  # image/build: the FAT boot partition starts at 1 MiB


def ovmf() -> tuple[Path, Path]:
    base = Path("/usr/share/OVMF")
    return base / "OVMF_CODE_4M.fd", base / "OVMF_VARS_4M.fd"


def fat(image: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an mtools command (``mcopy``, ``mdir``, ...) on the image's boot partition."""
    cmd, rest = args[0], args[1:]
    return subprocess.run([cmd, "-i", f"{image}@@{BOOT_OFFSET}", *rest], capture_output=True,
                          text=True, check=check, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})


@dataclass
class Guest:
    image: Path
    workdir: Path
    address: str = GUEST_ADDRESS
    ports: dict[int, int] = field(default_factory=lambda: {22: 2222, 443: 8443})
    memory_mib: int = 1536
    arch: str = "amd64"
    kernel: tuple[Path, Path] | None = None  # arm64: (vmlinuz, initrd) for -M virt direct boot
    # guest "10.0.2.100:8883" -> host "127.0.24.2:PORT" (one socat per connection)
    guestfwd: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    key: Path | None = None

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def ssh_keypair(self) -> str:
        self.key = self.workdir / "id_ed25519"
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci@host",
                            "-f", str(self.key)], check=True)
        return (self.workdir / "id_ed25519.pub").read_text().strip()

    def boot(self) -> None:
        forwards = ",".join(f"hostfwd=tcp:{self.address}:{host}-:{guest}"
                            for guest, host in self.ports.items())
        for inside, outside in self.guestfwd.items():  # no commas: -nic splits on them
            forwards += f",guestfwd=tcp:{inside}-cmd:socat STDIO TCP:{outside}"
        common = ["-smp", "2", "-m", str(self.memory_mib), "-display", "none", "-no-reboot",
                  "-drive", f"file={self.image},format=raw,if=virtio",
                  "-nic", f"user,id=net0,model=virtio-net-pci,restrict=on,{forwards}",
                  "-serial", f"file:{self.console}", "-device", "virtio-rng-pci",
                  "-monitor", f"unix:{self.workdir / 'monitor'},server,nowait"]
        if self.arch == "amd64":  # UEFI: OVMF, then systemd-boot from the image's ESP
            code, vars_template = ovmf()
            vars_file = self.workdir / "OVMF_VARS.fd"
            shutil.copy(vars_template, vars_file)
            cmd = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", *common,
                   "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                   "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"]
        else:  # the Pi image's own kernel and initrd on qemu's generic arm64 machine
            assert self.kernel is not None
            cmd = ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72", *common,
                   "-kernel", str(self.kernel[0]), "-initrd", str(self.kernel[1]),
                   "-append", "root=LABEL=gwroot-a ro rootwait console=ttyAMA0"]
        with open(self.workdir / "qemu.log", "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def monitor(self, command: str) -> str:
        """One command on qemu's human monitor (``hostfwd_add``, ...); its reply."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.workdir / "monitor"))
            sock.recv(4096)  # banner and prompt
            sock.sendall(command.encode() + b"\n")
            time.sleep(0.5)
            return sock.recv(4096).decode(errors="replace")

    @contextlib.contextmanager
    def forward(self, host_port: int, guest_port: int) -> Iterator[None]:
        """Forward ``address:host_port`` to the guest while the block runs. The fixed MQTT
        port 8883 is shared with every hub on this machine: hold /tmp/gw-ports.lock."""
        with open("/tmp/gw-ports.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rule = f"tcp:{self.address}:{host_port}-:{guest_port}"
            reply = self.monitor(f"hostfwd_add net0 {rule}")
            if "Could not" in reply:
                raise AssertionError(f"qemu: {reply.strip()}")
            try:
                yield
            finally:
                self.monitor(f"hostfwd_remove net0 tcp:{self.address}:{host_port}")

    def ssh(self, command: str, *, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        assert self.key is not None
        cmd = ["ssh", "-q", "-i", str(self.key), "-p", str(self.ports[22]),
               "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
               f"root@{self.address}", command]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                                input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"guest: {command!r} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def wait_for_ssh(self, timeout: float = 600) -> float:
        """Seconds from boot until SSH answers."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.ssh("true", check=False, timeout=30).returncode == 0:
                    return time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
            time.sleep(3)
        raise AssertionError(f"no SSH within {timeout} s:\n{self.tail()}")

    def wait(self, condition: str, timeout: float = 120, interval: float = 2) -> str:
        """Poll a shell condition in the guest until it exits 0; its output."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.ssh(condition, check=False)
            if result.returncode == 0:
                return result.stdout
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {condition!r}: {result.stdout}"
                                     f"{result.stderr}")
            time.sleep(interval)

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no console output)"

    def shutdown(self, timeout: float = 120) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ssh("systemctl poweroff", check=False, timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
