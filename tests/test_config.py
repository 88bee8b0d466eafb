"""Job options: defaults < TOML job file < command-line flags; errors name the file and key."""

import os

import pytest

from conftest import REPO
from hpcllm.cli import build_parser
from hpcllm.config import load_config
from hpcllm.errors import HpcllmError


def parse(argv, job="embed"):
    return load_config(build_parser().parse_args([job, *argv]), job)


def test_toml_then_flags(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text('model = "m.h5"\ninput = "c.jsonl"\noutput = "out"\ntp = 2\nshard_docs = 50\n'
                    '[embed]\nout_dtype = "float16"\n[score]\nstride = 7\n')
    cfg = parse(["--config", str(toml), "--output", "elsewhere", "--shard-docs", "10"])
    assert (cfg.model, cfg.input, cfg.output, cfg.tp, cfg.shard_docs, cfg.out_dtype) == \
        ("m.h5", "c.jsonl", "elsewhere", 2, 10, "float16")
    assert parse(["--config", str(toml)], job="score").stride == 7


def test_result_hash_tracks_only_result_options():
    base = parse(["--model", "m", "--input", "c", "--output", "o"])
    assert base.result_hash("embed") == parse(["--model", "m", "--input", "c", "--output", "o2", "--tp", "2",
                                               "--batch-tokens", "99"]).result_hash("embed")
    assert base.result_hash("embed") != parse(["--model", "m", "--input", "c", "--output", "o",
                                               "--max-length", "64"]).result_hash("embed")
    assert base.result_hash("embed") != base.result_hash("score")


@pytest.mark.parametrize("text,message", [
    ('model = "m"\nbogus = 1\n', "unknown option 'bogus'"),
    ('tp = "two"\n', "option 'tp' must be int"),
    ('tp = [\n', "invalid TOML"),
])
def test_bad_job_files(tmp_path, text, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(HpcllmError, match=message) as err:
        parse(["--config", str(toml), "--model", "m", "--input", "c", "--output", "o"])
    assert str(toml) in str(err.value)


def test_required_options_and_missing_file(tmp_path):
    with pytest.raises(HpcllmError, match="--input is required"):
        parse(["--model", "m", "--output", "o"])
    with pytest.raises(HpcllmError, match="config file not found"):
        parse(["--config", str(tmp_path / "nope.toml")])


def test_shipped_job_file_parses():
    cfg = parse(["--config", os.path.join(REPO, "jobs", "minilm-embed.toml")])
    assert cfg.input == "data/sample.jsonl" and cfg.id_field == "id"
