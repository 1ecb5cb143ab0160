"""Start N processes of one experiment command on this machine, joined through `jax.distributed`.

    python -m launch.multihost --num-processes 2 [--cpu-devices 2] -- python -m experiments.sinusoid ...

Process i runs the command with `--coordinator 127.0.0.1:PORT --num-processes N --process-id i` appended
(a free port unless `--port`); each output line is streamed with an `[i] ` prefix, and the launcher's own
lines (`[launch] ...`, on stderr) give each process's pid. When a process fails or is killed, one line
names it (and the signal), the others are stopped within `--grace` seconds (SIGTERM, then SIGKILL: they
would otherwise wait on its collectives) and the launcher exits with the failing status (128 + the signal
for a killed one); it exits 0 when all succeed. Running the same command again resumes from the last
checkpoint. `--cpu-devices K` gives every process K fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=K), to try multi-host data parallelism on one machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_command(command: Sequence[str], coordinator: str, num_processes: int, process_id: int) -> list[str]:
    """`command` with the runtime flags of process `process_id` appended."""
    return [*command, "--coordinator", coordinator, "--num-processes", str(num_processes),
            "--process-id", str(process_id)]


def _stream(prefix: str, source: IO[bytes], lock: threading.Lock) -> None:
    for raw in iter(source.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        with lock:
            sys.stdout.write(f"{prefix}{line}\n")
            sys.stdout.flush()
    source.close()


def describe_exit(code: int) -> str:
    """How a process ended, from its `Popen.returncode`: "exited with status 3", "was killed by SIGKILL"."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM the still-running processes we started, then SIGKILL those left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    cpu_devices: Optional[int] = None,
    grace: float = 10.0,
) -> int:
    """Run `num_processes` copies of `command`; return 0 if all succeed, else the first failure's status. After
    a failure the others get SIGTERM, and SIGKILL `grace` seconds later."""
    coordinator = f"{host}:{port or free_port(host)}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    lock = threading.Lock()
    procs, threads = [], []
    try:
        for i in range(num_processes):
            p = subprocess.Popen(process_command(command, coordinator, num_processes, i), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(p)
            with lock:
                print(f"[launch] process {i}: pid {p.pid}", file=sys.stderr, flush=True)
            t = threading.Thread(target=_stream, args=(f"[{i}] ", p.stdout, lock), daemon=True)
            t.start()
            threads.append(t)
        status = 0
        running = set(range(num_processes))
        while running:
            for i in sorted(running):
                code = procs[i].poll()
                if code is None:
                    continue
                running.discard(i)
                if code != 0 and status == 0:
                    status = code if code > 0 else 128 - code  # killed by a signal: 128 + signal number
                    with lock:
                        print(f"[launch] process {i} of {num_processes} (pid {procs[i].pid}) {describe_exit(code)}; "
                              f"stopping the others (at most {grace:g} s)", file=sys.stderr, flush=True)
                    _stop(procs, grace)
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs, grace)
        status = 130
    for t in threads:
        t.join(timeout=5)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("error: expected `-- COMMAND ...` after the launcher's options", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m launch.multihost", description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, required=True, help="processes to start")
    parser.add_argument("--host", default="127.0.0.1", help="coordinator host (this machine)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices per process")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the others get to stop after a process fails, before SIGKILL (default: 10)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if args.num_processes < 1 or not command:
        print(f"error: --num-processes={args.num_processes} and command {command!r}; expected >= 1 and a command",
              file=sys.stderr)
        return 2
    if not args.grace >= 0:
        print(f"error: --grace={args.grace}; expected seconds >= 0", file=sys.stderr)
        return 2
    return launch(command, args.num_processes, host=args.host, port=args.port, cpu_devices=args.cpu_devices,
                  grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
