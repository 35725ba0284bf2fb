"""--prompts from files datasets reads (parquet, csv, json, a save_to_disk directory) with --prompt-column,
--messages-column and --split; malformed rows named by index; unreadable types refused."""
import json

import pytest

from opd_kernels.hf.tiny import tiny_tokenizer
from opd_kernels.trainer import config_from_args, load_prompts

datasets = pytest.importorskip("datasets")


def rows_to(tmp_path, kind, rows):
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"p.{kind}"
    if kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "csv":
        table.to_csv(str(path), index=False)
    else:
        path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("kind", ["parquet", "csv", "json"])
def test_text_prompts_from_a_column_equal_the_jsonl_ones(tmp_path, kind):
    tok = tiny_tokenizer()
    path = rows_to(tmp_path, kind, [{"question": "t5 t6 t7", "x": 1}, {"question": "t8 t9", "x": 2}])
    got = load_prompts(path, tok, vocab_size=131, prompt_column="question")
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text('{"prompt": "t5 t6 t7"}\n{"prompt": "t8 t9"}\n')
    assert got == load_prompts(str(jsonl), tok, vocab_size=131) and len(got) == 2


def test_ids_messages_and_splits_of_a_saved_dataset(tmp_path):
    tok = tiny_tokenizer()
    messages = [[{"role": "user", "content": "t5 t6"}], [{"role": "system", "content": "t7"},
                                                         {"role": "user", "content": "t8"}]]
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"chat": messages, "ids": [[3, 4], [5, 6]]}),
                                 "test": datasets.Dataset.from_dict({"chat": messages[:1], "ids": [[7, 8]]})})
    data.save_to_disk(str(tmp_path / "saved"))
    saved = str(tmp_path / "saved")
    assert load_prompts(saved, vocab_size=131, prompt_column="ids") == [[3, 4], [5, 6]]
    assert load_prompts(saved, vocab_size=131, prompt_column="ids", split="test") == [[7, 8]]
    chat = load_prompts(saved, tok, vocab_size=131, messages_column="chat")
    text = tok.apply_chat_template(messages[1], add_generation_prompt=True, tokenize=False)
    assert chat[1] == tok(text, add_special_tokens=False)["input_ids"] and chat[0] != chat[1]
    with pytest.raises(ValueError, match=r"split: 'dev' is not a split of .* \(it holds \['test', 'train'\]\)"):
        load_prompts(saved, vocab_size=131, prompt_column="ids", split="dev")
    with pytest.raises(ValueError, match="split: 'test' given, but .*p.parquet' is a file with no splits"):
        load_prompts(rows_to(tmp_path, "parquet", [{"prompt_ids": [3]}]), vocab_size=131, split="test")


@pytest.mark.parametrize("rows, options, message", [
    ([{"prompt": "t5"}, {"prompt": None}], {}, r"row 1: 'prompt' must be a string, got NoneType"),
    ([{"q": "t5"}, {"q": "t6"}], dict(prompt_column="question"), r"row 0: has no prompt column 'question'"),
    ([{"chat": [{"role": "user", "content": "t5"}]}, {"chat": []}], dict(messages_column="chat"),
     r"row 1: 'chat' must be a non-empty list of messages"),
    ([{"ids": [3, 4]}, {"ids": [3, 999]}], dict(prompt_column="ids"), r"row 1: id 999 \(position 1\) is outside"),
])
def test_a_malformed_row_is_named_by_its_index(tmp_path, rows, options, message):
    path = rows_to(tmp_path, "parquet", rows)
    with pytest.raises(ValueError, match=f"prompts: {path}: {message}"):
        load_prompts(path, tiny_tokenizer(), vocab_size=131, **options)


def test_unreadable_files_and_directories_are_refused(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="datasets cannot read it as parquet"):
        load_prompts(str(broken), vocab_size=131)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="is a directory but not one datasets' save_to_disk wrote"):
        load_prompts(str(tmp_path / "plain_dir"), vocab_size=131)
    with pytest.raises(ValueError, match="prompt_column, messages_column: give at most one"):
        load_prompts(str(broken), vocab_size=131, prompt_column="a", messages_column="b")


def test_config_file_and_flags_take_the_dataset_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("student: tiny:llama\nteacher: tiny:llama\nprompts: data/\nprompt-column: question\n"
                    "split: test\n")
    cfg = config_from_args(["--config", str(path)])
    assert (cfg.prompt_column, cfg.messages_column, cfg.split) == ("question", None, "test")
    with pytest.raises(ValueError, match="prompt_column, messages_column: give at most one"):
        config_from_args(["--config", str(path), "--messages-column", "chat"])
    path.write_text("messages_column: chat\nsplit: validation\n")
    cfg = config_from_args(["--config", str(path), "--split", "train"])
    assert (cfg.messages_column, cfg.split) == ("chat", "train")


def test_opd_distill_trains_on_a_parquet_file(tmp_path, capsys):
    from opd_kernels.trainer import cli
    path = rows_to(tmp_path, "parquet", [{"q": [3 + i, 4 + i]} for i in range(4)])
    code = cli.main(["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", path, "--prompt-column", "q",
                     "--steps", "1", "--batch-size", "2", "--max-new-tokens", "2", "--output-dir",
                     str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "opd-distill: 1 steps" in capsys.readouterr().out
