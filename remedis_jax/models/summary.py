"""Prints the model zoo: every variant's depth, width and parameter count.

  python -m remedis_jax.models.summary            # markdown table
  python -m remedis_jax.models.summary --in_channels 1
  python -m remedis_jax.models.summary --stem small   # 3x3 root: 40*C*W fewer

Counts come from `jax.eval_shape` (no memory, about a second in all).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import jax
import jax.numpy as jnp

from remedis_jax.models.bit import STEMS
from remedis_jax.models.bit import VARIANTS
from remedis_jax.models.bit import create_model
from remedis_jax.models.common import count_params


def variant_param_count(name: str, num_classes: int | None = None,
                        in_channels: int = 3, stem: str = "bit") -> int:
  """Parameter count of `create_model(name, num_classes, stem=stem)`.

  Args:
    name: a VARIANTS name.
    num_classes: head size, None for the encoder alone.
    in_channels: image channels (the root conv's C_in).
    stem: a STEMS name; it sets the root kernel's size.

  Returns:
    The number of parameters.
  """
  model = create_model(name, num_classes=num_classes, stem=stem)
  images = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  return count_params(jax.eval_shape(model.init, jax.random.key(0), images))


def summary_table(in_channels: int = 3, stem: str = "bit") -> str:
  """Returns a markdown table of all VARIANTS.

  Args:
    in_channels: image channels used for the root conv.
    stem: a STEMS name, shown in the table header.

  Returns:
    The table as a string.
  """
  spec = STEMS[stem]
  size = spec["kernel_size"]
  root = (f"stem {stem!r}: {size}x{size}/{spec['strides']} root conv"
          + (" + 3x3/2 max-pool" if spec["max_pool"] else ", no max-pool"))
  rows = [root, "",
          "| name | blocks | root width | features | GN groups | params "
          "(no head) | + 1000-class head | + 21843-class head |",
          "|---|---|---|---|---|---|---|---|"]
  for name, spec in VARIANTS.items():
    width = int(64 * spec["width_factor"])
    counts = [variant_param_count(name, k, in_channels, stem)
              for k in (None, 1000, 21843)]
    rows.append(
        f"| {name} | {list(spec['block_counts'])} | {width} | {32 * width} | "
        f"{spec['num_groups']} | " + " | ".join(f"{c:,}" for c in counts)
        + " |")
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--in_channels", type=int, default=3)
  parser.add_argument("--stem", choices=list(STEMS), default="bit")
  args = parser.parse_args(argv)
  print(summary_table(args.in_channels, args.stem))


if __name__ == "__main__":
  main()
