"""The process the host crash test kills: guest writes with flushes, recovery and standard
checkpoints, conversions to reference points and destroys, on one running VM.

    python host_crash_workload.py HOST_DIR SEED

Journal (HOST_DIR/journal): ``B seq slot`` before a guest write, ``A seq slot`` once it and its
flush returned (acknowledged). Each write fills 64 KiB slot ``slot`` with the 8-byte ``seq``.
"""

from __future__ import annotations

import os
import random
import sys

from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, Host, checkpoints, refpoints

SLOT = 64 * 1024
SLOTS = 512


def main(directory: str, seed: int) -> None:
    rng = random.Random(seed)
    journal = os.open(os.path.join(directory, "journal"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    host = Host.open(directory)
    vm = host.vm("crash")
    disk = vm.disk(0)
    seq = 0
    while True:
        roll = rng.random()
        if roll < 0.75:
            seq += 1
            slot = rng.randrange(SLOTS)
            os.write(journal, f"B {seq} {slot}\n".encode())
            disk.write(slot * SLOT, seq.to_bytes(8, "little") * (SLOT // 8))
            disk.flush()
            os.write(journal, f"A {seq} {slot}\n".encode())
        elif roll < 0.85:
            checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid())
        elif roll < 0.92:
            recovery_points = [c for c in vm.checkpoints() if c.snapshot_type == SNAPSHOT_TYPE_RECOVERY]
            if recovery_points:
                refpoints.convert_to_reference_point(vm, recovery_points[-1].instance_id)
                for old in vm.reference_points()[:-1]:
                    refpoints.destroy_reference_point(vm, old.instance_id)
        elif roll < 0.96:
            checkpoints.create(vm)
        else:
            existing = vm.checkpoints()
            if existing:
                checkpoints.destroy(vm, rng.choice(existing).instance_id)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
