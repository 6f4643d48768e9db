"""Calls one library function on a file with the entry points' error semantics, for corpus cases
that test a reader below the command line: `python -m tests.bad_inputs.call FUNCTION ARG...`.

A `common.errors.UserError` prints `error: <message>` and exits 1, as `launch/main.py` does;
anything else propagates (a traceback is a failure of the case). On success it prints a one-line
summary of what was read.
"""

import sys

from common.errors import UserError


def _torch_weights(path: str) -> str:
  from common.weights.torch_weights import load_torch_weights  # pylint: disable=import-outside-toplevel
  tree = load_torch_weights(path)
  return f"read {len(tree)} tensors"


def _evaluate_small_fid(config: str, workdir: str, num_samples: str) -> str:
  from tests.bad_inputs.cases_eval import evaluate_with_a_small_network  # pylint: disable=import-outside-toplevel
  return evaluate_with_a_small_network(config, workdir, num_samples)


FUNCTIONS = {
    "torch_weights": _torch_weights,  # common.weights.torch_weights.load_torch_weights(PATH)
    "evaluate_small_fid": _evaluate_small_fid,  # common.training.trainer.evaluate, a small FID network
}


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in FUNCTIONS:
    sys.exit(f"usage: python -m tests.bad_inputs.call {{{'|'.join(FUNCTIONS)}}} ARG...")
  try:
    print(FUNCTIONS[argv[1]](*argv[2:]))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  main(sys.argv)
