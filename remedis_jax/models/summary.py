"""Prints the model zoo: every variant's depth, width and parameter count.

  python -m remedis_jax.models.summary            # markdown table
  python -m remedis_jax.models.summary --in_channels 1

Counts come from `jax.eval_shape` (no memory, about a second in all).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import jax
import jax.numpy as jnp

from remedis_jax.models.bit import VARIANTS
from remedis_jax.models.bit import create_model
from remedis_jax.models.common import count_params


def variant_param_count(name: str, num_classes: int | None = None,
                        in_channels: int = 3) -> int:
  """Parameter count of `create_model(name, num_classes)` via eval_shape.

  Args:
    name: a VARIANTS name.
    num_classes: head size, None for the encoder alone.
    in_channels: image channels (the root conv's C_in).

  Returns:
    The number of parameters.
  """
  model = create_model(name, num_classes=num_classes)
  images = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  return count_params(jax.eval_shape(model.init, jax.random.key(0), images))


def summary_table(in_channels: int = 3) -> str:
  """Returns a markdown table of all VARIANTS.

  Args:
    in_channels: image channels used for the root conv.

  Returns:
    The table as a string.
  """
  rows = ["| name | blocks | root width | features | GN groups | params "
          "(no head) | + 1000-class head | + 21843-class head |",
          "|---|---|---|---|---|---|---|---|"]
  for name, spec in VARIANTS.items():
    width = int(64 * spec["width_factor"])
    counts = [variant_param_count(name, k, in_channels)
              for k in (None, 1000, 21843)]
    rows.append(
        f"| {name} | {list(spec['block_counts'])} | {width} | {32 * width} | "
        f"{spec['num_groups']} | " + " | ".join(f"{c:,}" for c in counts)
        + " |")
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--in_channels", type=int, default=3)
  args = parser.parse_args(argv)
  print(summary_table(args.in_channels))


if __name__ == "__main__":
  main()
