#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 (jax >= 0.11 needs it), or explains what to install and fails.
# Looks at python3.12, python3.13 and python3 on PATH, then at pyenv's installed versions.
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for c in python3.12 python3.13 python3; do
  p=$(command -v "$c" 2>/dev/null) && ok "$p" && { echo "$p"; exit 0; }
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for p in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
    ok "$p" && { echo "$p"; exit 0; }
  done
fi
echo "frugal-diffusion needs Python >= 3.12 (jax >= 0.11 dropped 3.11) and none was found." >&2
echo "Install one, e.g. 'apt-get install python3.12 python3.12-venv', 'brew install python@3.12'," >&2
echo "or 'pyenv install 3.12', then run make again." >&2
exit 1
