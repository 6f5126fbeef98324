"""The I/O floor of a merge: read every byte of each input checkpoint once and write
one output of the base's size; no mergekit, no arithmetic, no deserialising.

    python benchmarks/raw_io.py OUT_FILE BASE_DIR [SECONDARY_DIR ...]

Any merge reads at least its inputs and writes at least one output, so no merge of
these checkpoints can beat this.
"""

import sys
from pathlib import Path

CHUNK = 64 << 20


def main(out: str, base: str, *secondaries: str) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(out, "wb") as sink:
        for index, folder in enumerate((base, *secondaries)):
            for shard in sorted(Path(folder).glob("*.safetensors")):
                with open(shard, "rb", buffering=0) as source:
                    while True:
                        count = source.readinto(buffer)
                        if not count:
                            break
                        if index == 0:
                            sink.write(view[:count])


if __name__ == "__main__":
    main(*sys.argv[1:])
