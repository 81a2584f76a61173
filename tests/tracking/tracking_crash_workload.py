"""The process the tracking crash test kills: writes, trims, seals, reopens, children and merges on
a tracked VHDX, logging each step to a journal the test reads back.

    python tracking_crash_workload.py DIR SEED

Journal lines (DIR/journal): ``B off len`` before a write or trim, ``W`` once it returned,
``S id`` once a seal returned, ``C path`` after a child was created (writes go to it from then on),
``M`` before a merge and ``m`` once it finished.
"""

from __future__ import annotations

import os
import random
import sys

from hvbackup import stack, tracking
from hvbackup.units import MiB

DISK_SIZE = 2048 * MiB


def main(directory: str, seed: int) -> None:
    rng = random.Random(seed)
    journal = os.open(os.path.join(directory, "journal"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(line: str) -> None:
        os.write(journal, (line + "\n").encode())

    chain = [os.path.join(directory, "base.vhdx")]
    disk = stack.open(chain[-1])
    payload = os.urandom(2 * MiB)
    while True:
        roll = rng.random()
        if roll < 0.85:
            offset = rng.randrange(0, DISK_SIZE, 512)
            length = min(rng.choice([512, 4096, 65536, 300_000, 2 * MiB]), DISK_SIZE - offset)
            log(f"B {offset} {length}")
            if rng.random() < 0.15:
                disk.trim(offset, length)
            else:
                disk.write(offset, payload[:length])
            log("W")
        elif roll < 0.92:
            log(f"S {disk.seal()}")
        elif roll < 0.96:
            disk.close()
            log(f"S {tracking.status(chain[-1]).most_recent_id}")
            disk = stack.open(chain[-1])
        elif roll < 0.98 and len(chain) == 1:
            disk.close()
            log(f"S {tracking.status(chain[-1]).most_recent_id}")
            chain.append(os.path.join(directory, f"child{rng.randrange(1 << 30)}.avhdx"))
            stack.create(chain[-1], type="differencing", parent=chain[0], block_size=MiB).close()
            log(f"C {chain[-1]}")
            disk = stack.open(chain[-1])
        elif len(chain) == 2:
            disk.close()
            log(f"S {tracking.status(chain[-1]).most_recent_id}")
            log("M")
            stack.merge(chain.pop())
            log("m")
            disk = stack.open(chain[-1])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
