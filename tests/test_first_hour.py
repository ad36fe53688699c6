"""A user's first hour: too-small images refused clearly, one CLI (help, aliases, mistakes as sentences),
the shipped shapes samples, and what serves when nothing is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unioncam
from unioncam import InvalidInputError
from unioncam.models import load_model, model_cost
from unioncam.models.cost import fits, smallest_side


# ------------------------------------------------------------------------------- too-small images


def test_too_small_image_names_the_smallest_size_the_model_takes():
    model = load_model("shapes", "random")  # three 2×2 poolings: 8×8 is the smallest
    assert smallest_side(model) == 8 and fits(model, (8, 8)) and not fits(model, (7, 7))
    with pytest.raises(InvalidInputError) as err:
        unioncam.explain(model, torch.rand(3, 6, 6), method="gradcam", precision="fp32")
    assert err.value.field == "image" and "6×6" in str(err.value) and "at least 8×8" in str(err.value)
    with pytest.raises(InvalidInputError) as err:  # one side is enough
        unioncam.explain_batch(model, [torch.rand(3, 16, 16), torch.rand(3, 5, 40)], method="gradcam",
                               precision="fp32")
    assert err.value.field == "images[1]" and "at least 8×8" in str(err.value)
    assert unioncam.explain(model, torch.rand(3, 8, 8), method="gradcam", precision="fp32").saliency.shape == (8, 8)


def test_archive_check_names_the_smallest_size_too():
    with pytest.raises(InvalidInputError) as err:
        model_cost("vgg16", 16)
    assert err.value.field == "image-size" and "at least 32" in str(err.value)


# ------------------------------------------------------------------------------------ shipped samples

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "shapes"


def test_shipped_shape_samples_are_what_the_generator_makes_and_their_maps_mean_something(tmp_path):
    import runpy

    from unioncam.eval.groundtruth import make_sample

    script = runpy.run_path(str(SAMPLES / "make_samples.py"))
    script["main"](tmp_path)
    names = sorted(p.name for p in SAMPLES.glob("*.png"))
    assert names == ["cross.png", "disk.png", "ring.png", "square.png", "triangle.png"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
    model = load_model("shapes")
    for name, index in script["first_of_each_class"]().items():
        sample = make_sample(1, index, 64)
        res = unioncam.explain(model, unioncam.load_image(SAMPLES / f"{name}.png", size=None), precision="fp32")
        assert model.categories[res.target] == name
        inside, outside = res.saliency[sample.mask].mean(), res.saliency[~sample.mask].mean()
        assert inside > 2.5 * outside, (name, float(inside), float(outside))  # the map is on the shape
        assert res.details["seconds"] < 30


# ---------------------------------------------------------------------------------------- one CLI


def _subcommands():
    import argparse

    from unioncam.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_subcommand_has_help_and_every_option_says_what_it_does(capsys):
    from unioncam.cli import main

    _, commands = _subcommands()
    assert {"explain", "archive", "serve", "token", "evaluate", "figure"} <= set(commands)
    for name, p in commands.items():
        with pytest.raises(SystemExit) as ex:
            main([name, "--help"])
        assert ex.value.code == 0, name
        assert "usage: unioncam " + name in capsys.readouterr().out
        for action in p._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"


def test_the_command_line_reference_is_the_parsers_own():
    """docs/cli.md is generated from the parser: a changed option or help text must regenerate it."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("cli_reference", root / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "cli.md").read_text() == module.reference(), \
        "docs/cli.md is stale: run python scripts/cli_reference.py"


def test_the_same_things_have_the_same_names_everywhere():
    _, commands = _subcommands()
    model_commands = ("explain", "archive", "serve", "evaluate", "figure")
    for name in model_commands:
        opts = {o for a in commands[name]._actions for o in a.option_strings}
        for option in ("--model", "--weights", "--weights-seed", "--image-size", "--size", "--theta", "--layer",
                       "--batch-size"):
            assert option in opts, (name, option)
        dests = {a.dest for a in commands[name]._actions if "--weights-seed" in a.option_strings}
        assert dests == {"weights_seed"}, name
    # the old spellings still parse
    assert commands["explain"].parse_args(["x.png", "--seed", "3", "--size", "32"]).weights_seed == 3
    assert commands["serve"].parse_args(["--seed", "4", "--size", "48"]).image_size == 48
    ev = commands["evaluate"].parse_args(["folder", "--seed", "5", "--weights-seed", "6"])
    assert (ev.seed, ev.weights_seed) == (5, 6)
    assert commands["evaluate"].parse_args(["folder", "--sample-seed", "7"]).seed == 7
    assert commands["explain"].parse_args(["x.png", "--target", "281,285"]).target == [281, 285]
    assert commands["explain"].parse_args(["x.png", "--target", "281"]).target == 281


def _stale_run(tmp_path):
    """A run folder whose server is gone: its key file and config point at a port nothing listens on."""
    import json

    from unioncam.serve.torchserve.server import Ports, config_text, free_port

    run = tmp_path / "runs" / "current"
    run.mkdir(parents=True)
    (run / "config.properties").write_text(config_text(Ports(free_port(), free_port(), free_port(), 1, 2)))
    (run / "key_file.json").write_text(json.dumps({k: {"key": "x"} for k in ("management", "inference", "API")}))
    return tmp_path / "runs"


@pytest.mark.parametrize("argv, words", [
    (["token", "--runs", "{tmp}/none"], "does not exist"),
    (["token", "--runs", "{stale}"], "no server answers"),
    (["serve", "--port", "80000"], "--port: 80000 is not a TCP port"),
    (["serve", "--port", "65534"], "BASE…BASE+4"),
    (["serve", "--viewer-port", "-1"], "--viewer-port"),
    (["explain", "{sample}", "--target", "281,x"], "'281,x' is not a class index"),
    (["explain", "{sample}", "--target", "1", "--top-k", "2"], "exclude each other"),
    (["explain", "{sample}", "--image-size", "4", "--method", "gradcam", "--out", "{tmp}/o"], "at least 8×8"),
    (["explain", "{sample}", "--target", "9", "--method", "gradcam", "--out", "{tmp}/o"], "target"),
    (["explain", "{tmp}/missing.png"], "cannot be read"),
    (["explain", "{sample}", "--cmap", "nope"], "not a matplotlib colormap"),
    (["explain", "{sample}", "--alpha", "7"], "a number in [0, 1]"),
    (["serve", "--config", "{tmp}/missing.properties"], "missing.properties"),
    (["figure", "--out", "{tmp}/f.png"], "give IMAGE files or --shapes N"),
    (["evaluate", "{tmp}/no-folder", "--out", "{tmp}/e"], "is not a directory"),
    (["archive", "--workers", "0", "--model-store", "{tmp}/store"], "workers"),
])
def test_a_mistake_is_one_sentence_and_status_2(tmp_path, capsys, argv, words):
    from unioncam.cli import main

    fill = {"tmp": str(tmp_path), "sample": str(SAMPLES / "cross.png")}
    if any("{stale}" in a for a in argv):
        fill["stale"] = str(_stale_run(tmp_path))
    argv = [a.format(**fill) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as ex:  # argparse's own refusal: usage + one line, status 2
        rc = ex.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert words in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"unioncam {argv[0]}: error: "), err


# ------------------------------------------------------------------------------ the default model


def test_left_out_model_is_vgg16_when_cached_else_the_shapes_cnn(tmp_path, monkeypatch):
    from unioncam.models.defaults import choose, imagenet_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    offline = choose(None, None)
    assert (offline.model, offline.weights) == ("shapes", "shipped")
    assert "shapes CNN" in offline.notice and "--model vgg16" in offline.notice
    assert choose("resnet18", None).weights == "imagenet" and choose("shapes", None).weights == "shipped"
    assert choose(None, "random") == choose("vgg16", "random")  # random only when asked for
    cached = imagenet_cache_file("vgg16")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    online = choose(None, None)
    assert (online.model, online.weights, online.notice) == ("vgg16", "imagenet", None)


def test_archive_and_serve_share_the_rule_offline(tmp_path, monkeypatch, capsys):
    """``archive`` without --model/--weights builds the shapes archive offline, as ``serve`` would serve it;
    the page's /api/info and the handler's details then name the weights."""
    import yaml

    from unioncam.cli import main
    from unioncam.serve.archive import archived_yaml
    from unioncam.serve.viewer import archive_info

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["archive", "--model-store", str(tmp_path / "store")]) == 0
    captured = capsys.readouterr()
    assert "shapes CNN" in captured.err and "shipped" in captured.out
    mar = tmp_path / "store" / "unioncam.mar"
    handler = yaml.safe_load(archived_yaml(mar))["handler"]
    assert (handler["model"], handler["source"], handler["image_size"]) == ("shapes", "shipped", 64)
    info = archive_info(mar, "unioncam")
    assert (info["architecture"], info["weights"]) == ("shapes", "shipped")
    assert main(["archive", "--weights", "random", "--model", "shapes", "--weights-seed", "3",
                 "--model-store", str(tmp_path / "store"), "--name", "r"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights (seed 3)" in captured.err and "random (seed 3)" in captured.out
    assert archive_info(tmp_path / "store" / "r.mar", "r")["weights"] == "random (seed 3)"


def test_each_explanation_names_its_weights(tmp_path):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    from .fakes import FakeContext, random_png

    ctx = FakeContext(tmp_path, [{"explain": "True"}])
    ctx.model_yaml_config["handler"].update(model="shapes", seed=2)
    h = UnionCAMHandler()
    h.initialize(ctx)
    out = h.handle([{"image": random_png(), "method": b"gradcam"}], ctx)
    assert out[0]["details"]["weights"] == "random (seed 2)"


@pytest.mark.server
def test_serve_with_nothing_named_serves_the_shapes_cnn_and_its_map_is_on_the_shape(tmp_path):
    """The try-out offline: ``unioncam serve`` (what ./serve.sh runs) without --model/--weights."""
    import base64
    import json
    import os
    import subprocess
    import sys

    import requests

    from unioncam.eval.groundtruth import make_sample
    from unioncam.serve.torchserve.server import Ports, config_text, free_port

    from .fakes import serving

    config = tmp_path / "config.properties"
    config.write_text(config_text(Ports.free()))
    viewer_port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TORCH_HOME=str(tmp_path / "torch"),
               TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "unioncam", "serve", "--model-store", str(tmp_path / "store"), "--runs",
         str(tmp_path / "runs"), "--run-name", "t", "--config", str(config), "--viewer-port", str(viewer_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    with serving(proc) as served:
        text = "".join(served.lines)
        assert "using the trained shapes CNN" in text and "--model vgg16" in text
        assert "model: shapes (weights shipped), 64²" in text and "RANDOM" not in text
        assert "try: curl" in text and "samples/shapes/cross.png" in text
        key = json.loads((tmp_path / "runs" / "t" / "key_file.json").read_text())["inference"]["key"]
        url = f"http://127.0.0.1:{_inference_port(config)}/explanations/unioncam"
        r = requests.post(url, data=(SAMPLES / "cross.png").read_bytes(), headers={"Authorization": f"Bearer {key}"},
                          timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["class_name"] == "cross" and body["details"]["weights"] == "shipped"
        m = body["map"]
        sal = torch.frombuffer(bytearray(base64.b64decode(m["data"])), dtype=torch.float16).reshape(m["shape"])
        import runpy

        index = runpy.run_path(str(SAMPLES / "make_samples.py"))["first_of_each_class"]()
        mask = make_sample(1, index["cross"], 64).mask
        assert mask.flatten()[sal.float().flatten().argmax()]  # the hottest pixel is on the cross
        assert body["timings"]["explain_ms"] < 30_000
        info = requests.get(f"http://127.0.0.1:{viewer_port}/api/info", timeout=30).json()
        assert (info["architecture"], info["weights"], info["image_size"]) == ("shapes", "shipped", 64)


def _inference_port(config: Path) -> int:
    from unioncam.serve.torchserve.server import _ports_of

    return _ports_of(config.read_text()).inference
