"""experiments/quickstart.py's control flow, with stand-ins for pretraining and the sweep (the
real pipeline is what `make quickstart` runs): a preempted stage stops it."""
from experiments import label_fraction_sweep, quickstart
from remedis_jax import export, train_simclr


def test_preempted_pretraining_stops_before_export_and_sweep(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(train_simclr, "train_and_evaluate",
                      lambda config, workdir: {"preempted": True, "steps": 7})
  monkeypatch.setattr(export, "export_workdir", lambda *a, **k: calls.append("export"))
  monkeypatch.setattr(label_fraction_sweep, "run_sweep", lambda *a, **k: calls.append("sweep"))
  result = quickstart.run(str(tmp_path))
  assert result["preempted"] and result["export"] is None and result["sweep"] is None
  assert not calls
  assert "preempted at step 7 and saved; rerun the same command" in capsys.readouterr().out


def test_preempted_sweep_is_reported(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(train_simclr, "train_and_evaluate",
                      lambda config, workdir: {"preempted": False, "steps": 300})
  monkeypatch.setattr(export, "export_workdir", lambda *a, **k: None)
  monkeypatch.setattr(label_fraction_sweep, "run_sweep",
                      lambda *a, **k: {"counts": {"finished": 2, "interrupted": 1}})
  result = quickstart.run(str(tmp_path))
  assert result["preempted"] and result["export"].endswith("export/step_300")
  assert "The sweep was preempted; rerun the same command to resume." in capsys.readouterr().out
