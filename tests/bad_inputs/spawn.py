"""Runs a command as this process's child and records its exit status and peak memory.

    python tests/bad_inputs/spawn.py RESULT.json COMMAND [ARG ...]

The harness runs every case through this small process because a process forked from a large one
(the pytest process, often over 1 GB) starts with its parent's high-water mark: `wait4`'s
`ru_maxrss` of a direct child reports at least the parent's resident size. Forked from this small
interpreter instead, the command's `ru_maxrss` is its own. RESULT.json gets
{"status": wait status, "maxrss_kib": peak resident KiB}.
"""

import json
import os
import sys


def main() -> None:
  result, argv = sys.argv[1], sys.argv[2:]
  pid = os.fork()
  if pid == 0:
    try:
      os.execvp(argv[0], argv)
    finally:
      os._exit(127)  # exec failed
  _, status, usage = os.wait4(pid, 0)
  with open(result, "w", encoding="utf-8") as f:
    json.dump({"status": status, "maxrss_kib": usage.ru_maxrss}, f)


if __name__ == "__main__":
  main()
