"""Command-line messages name what is real: the layers of the model in use and the files a stage wrote (#17)."""
import json
import re

import pytest
import yaml

from neuroscribe import pipeline
from neuroscribe.cli import main as cli_main
from neuroscribe.models import load_model


def test_unknown_layer_on_a_trained_checkpoint_lists_that_models_layers(tmp_path, capsys):
    """`neuroscribe record` after `neuroscribe train`: the model in use is the trained checkpoint, and a name from
    another architecture's naming still gets that model's nearest real layers, never an empty list."""
    from safetensors.torch import save_file
    ck = tmp_path / "job" / "train" / "seed0" / "model.safetensors"
    ck.parent.mkdir(parents=True)
    save_file(load_model("torchvision:resnet18@none", num_classes=10).module.state_dict(), str(ck))
    (ck.parent / "model.safetensors.spec.json").write_text(json.dumps(
        {"arch": "torchvision:resnet18@none", "num_classes": 10, "class_names": list("abcdefghij")}))
    (tmp_path / "job" / "train.json").write_text(json.dumps({"checkpoint": str(ck)}))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"train": {"arch": "torchvision:resnet18"}, "layers": ["features.3"],
                                   "out": str(tmp_path / "job"), "workers": 0}))
    rc = cli_main(["record", str(job), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown layer 'features.3'" in err and f"checkpoint:{ck}" in err, err
    assert re.search(r"nearest valid names: \['layer\d\.\d', 'layer", err), err


@pytest.mark.parametrize("stage, written", [("flag", "flags.json"), ("ablate", "ablation.json"),
                                            ("evaluate", "evaluation.json")])
def test_stage_messages_name_the_files_written(tmp_path, monkeypatch, capsys, stage, written):
    monkeypatch.setattr(pipeline, stage, lambda cfg: {})
    rc = cli_main([stage, "--out", str(tmp_path / "job"), "--quiet"])
    assert rc == 0 and capsys.readouterr().out.strip() == f"{stage}: wrote {tmp_path / 'job' / written}"
