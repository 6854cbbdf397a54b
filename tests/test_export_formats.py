"""remedis_jax.export's formats on bad input: an unknown format, an output folder that exists,
a model without timm twin. Each is an error that names the thing and the fix, and nothing is
written or overwritten. Also: the timm export needs neither PyTorch nor TensorFlow, and the
command line runs end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax import export, models
from remedis_jax.models import bit_timm
from tests.fakes import fake_run_workdir, random_bit_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetuned_run(path, encoder=None, model=None):
  encoder = random_bit_params("R_micro") if encoder is None else encoder
  features = encoder["norm_pre_head"]["scale"].shape[0]
  classifier = {"kernel": np.zeros((features, 2), np.float32), "bias": np.zeros(2, np.float32)}
  results = {"task": {"num_classes": 2, "multi_label": False, "class_names": ["a", "b"]}}
  return fake_run_workdir(path, {"encoder": encoder, "classifier": classifier}, model=model,
                          results=results)


def test_unknown_format_names_the_formats(tmp_path):
  workdir = finetuned_run(tmp_path / "run")
  with pytest.raises(ValueError, match=r"unknown export format 'onnx'; --format takes one of "
                                       r"orbax, timm, savedmodel"):
    export.export_workdir(workdir, str(tmp_path / "out"), export_format="onnx")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("export_format", ["timm", "savedmodel"])
def test_an_existing_output_folder_is_never_written_into(tmp_path, export_format):
  workdir = finetuned_run(tmp_path / "run")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=f"{out} already exists and is not empty; nothing "
                                            "was written. Choose a new --out folder"):
    export.export_workdir(workdir, str(out), export_format=export_format)
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["out", "run"]  # no partial folder left behind


def test_orbax_export_is_not_overwritten(tmp_path):
  workdir = finetuned_run(tmp_path / "run")
  out = str(tmp_path / "out")
  export.export_workdir(workdir, out)
  before = (tmp_path / "out" / export.METADATA_FILE).read_text()
  with pytest.raises(FileExistsError, match="already holds an export"):
    export.export_workdir(workdir, out)
  assert (tmp_path / "out" / export.METADATA_FILE).read_text() == before
  metadata, params = export.load_export(out)
  assert sorted(params) == ["classifier", "encoder"]
  assert metadata["task"]["class_names"] == ["a", "b"]


def test_small_stems_and_vits_have_no_timm_twin(tmp_path):
  small = jax.eval_shape(models.create_model("R_micro", stem="small").init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  small = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), small)
  workdir = finetuned_run(tmp_path / "small", small, model={"stem": "small"})
  with pytest.raises(bit_timm.NoTimmTwinError) as error:
    export.export_workdir(workdir, str(tmp_path / "out"), export_format="timm")
  assert "R_micro with stem 'small' has no timm twin" in str(error.value)
  assert "--format=orbax (JAX) or --format=savedmodel" in str(error.value)
  assert not (tmp_path / "out").exists()

  for name in ("ViT-micro/4", "R_tiny_unknown"):
    with pytest.raises(bit_timm.NoTimmTwinError, match=f"{name} has no timm twin.*--format="):
      bit_timm.timm_twin(name, "bit", {})


def test_a_head_layer_before_the_classifier_has_no_timm_twin(tmp_path):
  encoder = random_bit_params("R_micro")
  parts = {"encoder": encoder, "head": {"hidden_0": {"kernel": np.zeros((256, 16), np.float32)}},
           "classifier": {"kernel": np.zeros((16, 2), np.float32),
                          "bias": np.zeros(2, np.float32)}}
  workdir = fake_run_workdir(tmp_path / "run", parts, model={"from_head_layer": True},
                             results={"task": {"num_classes": 2}})
  with pytest.raises(bit_timm.NoTimmTwinError, match="from_head_layer=True.*--format=savedmodel"):
    export.export_workdir(workdir, str(tmp_path / "out"), export_format="timm")
  assert not (tmp_path / "out").exists()


def test_timm_export_from_the_command_line_loads_neither_torch_nor_tensorflow(tmp_path):
  workdir = finetuned_run(tmp_path / "run")
  out = str(tmp_path / "timm")
  code = ("import json, runpy, sys\n"
          "sys.argv = ['remedis_jax.export', '--workdir', sys.argv[1], '--out', sys.argv[2], "
          "'--format=timm']\n"
          "try:\n"
          "  runpy.run_module('remedis_jax.export', run_name='__main__')\n"
          "except SystemExit as e:\n"
          "  assert not e.code, e.code\n"
          "print(json.dumps(sorted(m for m in ('torch', 'tensorflow', 'timm') "
          "if m in sys.modules)))\n")
  done = subprocess.run([sys.executable, "-c", code, workdir, out], cwd=REPO, check=True,
                        capture_output=True, text=True, timeout=300)
  assert json.loads(done.stdout.strip().splitlines()[-1]) == []
  assert f"Exported R_micro (step 7) from {workdir} to {out} as timm" in done.stdout
  assert sorted(os.listdir(out)) == [export.TIMM_CONFIG_FILE, export.TIMM_WEIGHTS_FILE]
