"""Prompts: validated before training, types checked, every error names file:line."""
import json

import pytest
from trainer_helpers import make, one_thread  # noqa: F401 (one_thread: autouse)

from opd_kernels.hf.tiny import tiny_tokenizer
from opd_kernels.trainer import cli, load_prompts


def jsonl(tmp_path, *lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("line, message", [
    ("7", "expected a JSON object with 'prompt' or 'prompt_ids', got int"),
    ("null", "expected a JSON object with 'prompt' or 'prompt_ids', got null"),
    ('"the prompt is here"', "expected a JSON object with 'prompt' or 'prompt_ids', got str"),
    ('{"prompt_ids": "12"}', "'prompt_ids' must be a list of integers, got str '12'"),
    ('{"prompt_ids": [3, 4.7]}', "'prompt_ids'\\[1\\] must be an integer, got 4.7"),
    ('{"prompt_ids": [3, true]}', "'prompt_ids'\\[1\\] must be an integer, got True"),
    ('{"prompt_ids": [3, -1]}', "id -1 \\(position 1\\) is outside the vocabulary \\[0, 131\\)"),
    ('{"prompt_ids": [3, 131]}', "id 131 \\(position 1\\) is outside the vocabulary \\[0, 131\\)"),
    ('{"prompt": 12}', "'prompt' must be a string, got int"),
    ('{"text": "hi"}', "has neither 'prompt' nor 'prompt_ids'"),
    ('{"prompt_ids": []}', "the prompt is empty"),
    ('{"prompt_ids": [3, 4]', "invalid JSON \\(Expecting ',' delimiter at column 22\\)"),
    ("[" * 100000 + "]" * 100000, "JSON nested too deeply|invalid JSON"),
])
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, line, message):
    path = jsonl(tmp_path, '{"prompt_ids": [3, 4]}', "", line)  # line 3: the blank line 2 still counts
    with pytest.raises(ValueError, match=f"prompts: {path}:3: ({message})"):
        load_prompts(path, tiny_tokenizer(), vocab_size=131)


def test_prompt_length_is_checked_against_the_model_positions(tmp_path):
    path = jsonl(tmp_path, json.dumps({"prompt_ids": [3] * 100}))
    assert load_prompts(path, vocab_size=131, max_positions=128, max_new_tokens=28) == [[3] * 100]
    with pytest.raises(ValueError, match=f"{path}:1: 100 prompt ids \\+ max_new_tokens 29 exceed the model's 128 "
                                         "positions; lower --max-prompt-len or --max-new-tokens"):
        load_prompts(path, vocab_size=131, max_positions=128, max_new_tokens=29)
    assert load_prompts(path, max_prompt_len=50, vocab_size=131, max_positions=128, max_new_tokens=29) == [[3] * 50]


@pytest.mark.parametrize("spec", ["random:-1:5", "random:4:0", "random:4", "random:a:3", "random:2:3:4"])
def test_random_spec_is_checked(spec):
    with pytest.raises(ValueError, match="prompts: (expected random:COUNT:LEN with two integers|random:COUNT:LEN "
                                         "needs COUNT >= 1 and LEN >= 1)"):
        load_prompts(spec, vocab_size=131)


def test_encoding_errors_name_the_file_and_a_bom_is_skipped(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"t5 t6\nt7 \xff\xfe t8\n")
    with pytest.raises(ValueError, match=f"prompts: {bad}:2: not UTF-8"):
        load_prompts(str(bad), tiny_tokenizer())
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt_ids": [5, 6]}).encode() + b"\n")
    assert load_prompts(str(bom), vocab_size=131) == [[5, 6]]
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbft5 t6\r\nt7\r\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("t5 t6\nt7\n")
    assert load_prompts(str(text), tiny_tokenizer()) == load_prompts(str(plain), tiny_tokenizer())


def test_the_cli_reports_bad_prompts_before_training(tmp_path, capsys):
    path = jsonl(tmp_path, '{"prompt_ids": [3, 4]}', '{"prompt_ids": [3, 500]}')
    rc = cli.main(["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", path, "--device", "cpu",
                   "--output-dir", str(tmp_path / "o"), "--steps", "1", "--no-progress"])
    assert rc == 2 and f"prompts: {path}:2: id 500 (position 1) is outside the vocabulary" in capsys.readouterr().err
    rc = cli.main(["--student", "tiny:gpt2", "--teacher", "tiny:gpt2", "--prompts", "random:2:120", "--device", "cpu",
                   "--output-dir", str(tmp_path / "o"), "--steps", "1", "--no-progress", "--max-new-tokens", "16"])
    assert rc == 2 and "120 prompt ids + max_new_tokens 16 exceed the model's 128 positions" in capsys.readouterr().err


@pytest.mark.parametrize("prompts, message", [
    ([[3, 4], [3, 200]], "prompts\\[1\\]: id 200"),
    ([[3, 4], "34"], "prompts\\[1\\] must be a list of token ids, got str"),
    ([[3, 4.0]], "prompts\\[0\\]: id 1 must be an integer"),
    ([[]], "prompts\\[0\\] is empty"),
])
def test_the_trainer_checks_python_prompts_too(tmp_path, prompts, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, 1, 0, prompts=prompts)
