"""Engine adapters (opd_kernels.teacher.engines): SGLang and vLLM teachers behind the teacher protocol.

Tested against a recorded response format; not run against a live engine. Fake engines on 127.0.0.1 answer
in each engine's documented JSON format with hidden states of a tiny local teacher: after the final norm for
SGLang (what its return_hidden_states gives), before it for vLLM (its extraction docs: "not normalized using
the output norm"; the states go through a file in the shared storage path). The adapter's loss and student
gradients must equal the in-process teacher's (float32, 1e-5)."""
import fcntl
import http.server
import json
import os
import threading
import uuid

import pytest
import torch

from opd_kernels import hf
from opd_kernels.hf.tiny import tiny_causal_lm
from opd_kernels.teacher import TeacherRequestError
from opd_kernels.teacher.engines import SGLangTeacher, VLLMTeacher

V = 131
SERVER_DIR = "/srv/hidden_states"  # the storage path's name on the (fake) engine's machine


def _teacher(family, seed=3):
    return tiny_causal_lm(family, seed=seed, hidden_size=48).eval()


def _checkpoint(model, tmp_path):
    folder = tmp_path / "teacher"
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _pre_norm(model, ids):
    """The residual stream after the last layer (the final norm's input), (1, n, H)."""
    seen = {}
    norm = hf.decoder_stack(model).norm

    def hook(module, args, out):  # returns None: the output stays the norm's
        seen.setdefault("x", args[0].detach())

    handle = norm.register_forward_hook(hook)
    try:
        with torch.no_grad():
            post = hf.hidden_states(model, ids)
    finally:
        handle.remove()
    assert torch.allclose(norm(seen["x"]), post)  # the hook saw the norm's input
    return seen["x"]


class _Engine:
    """A fake engine on 127.0.0.1: http.server in a thread, each request answered from ``answer(path, body)``."""

    def __init__(self, answer):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(*answer("GET " + self.path, None))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                self._send(*answer("POST " + self.path, body))

            def log_message(self, *args):
                pass

        self.requests = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 10
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _sglang_answer(model, *, post_norm=True, drop_prefix=0):
    """SGLang's /generate answer: per row meta_info.hidden_states = [prompt block [n][H]] (one new token asked:
    its own state is not included), as in sglang's test_hidden_states.py."""
    def answer(route, body):
        if route != "POST /generate":
            return 404, {"error": route}
        assert body["return_hidden_states"] is True and body["sampling_params"]["max_new_tokens"] == 1
        out = []
        for row in body["input_ids"]:
            ids = torch.tensor([row])
            with torch.no_grad():
                h = hf.hidden_states(model, ids) if post_norm else _pre_norm(model, ids)
            h = h[0, drop_prefix:]
            out.append({"text": "", "output_ids": [5],
                        "meta_info": {"prompt_tokens": len(row), "completion_tokens": 1,
                                      "hidden_states": [h.tolist()]}})
        return 200, out
    return answer


def _vllm_answer(model, storage, *, layers=1, wrong_tokens=False):
    """vLLM's /v1/completions answer with kv_transfer_params.hidden_states_path; the file (hidden_states
    [n, layers, H] before the final norm, token_ids [n]) written under an exclusive flock on <path>.lock, as
    ExampleHiddenStatesConnector does."""
    from safetensors.torch import save_file

    def answer(route, body):
        if route == "GET /v1/models":
            return 200, {"object": "list", "data": [{"id": "tiny-teacher", "object": "model"}]}
        if route != "POST /v1/completions":
            return 404, {"error": route}
        row = body["prompt"]
        req = f"cmpl-{uuid.uuid4().hex}"
        path = storage / f"{req}.safetensors"
        fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            pre = _pre_norm(model, torch.tensor([row]))[0]
            hs = torch.stack([torch.randn_like(pre)] * (layers - 1) + [pre], dim=1)  # last layer id last
            tok = torch.tensor(row[::-1] if wrong_tokens else row)
            save_file({"hidden_states": hs.contiguous(), "token_ids": tok}, str(path))
        finally:
            os.close(fd)
        return 200, {"id": req, "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                     "usage": {"prompt_tokens": len(row), "completion_tokens": 1, "total_tokens": len(row) + 1},
                     "kv_transfer_params": {"hidden_states_path": f"{SERVER_DIR}/{req}.safetensors"}}
    return answer


def _batch(seed=0, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[2, 9:] = 0   # right padding
    completion = torch.zeros(b, t, dtype=torch.bool)
    completion[:, 6:] = True
    return ids, mask, completion


def _loss_and_grads(student, teacher, ids, mask, completion):
    student.zero_grad(set_to_none=True)
    loss = hf.distillation_loss(student, teacher, ids, attention_mask=mask, loss_mask=completion)
    loss.backward()
    grads = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
    return loss.detach(), grads


def _assert_same(student, adapter, model, **kw):
    ids, mask, completion = _batch(**kw)
    ref, ref_g = _loss_and_grads(student, model, ids, mask, completion)
    got, got_g = _loss_and_grads(student, adapter, ids, mask, completion)
    assert ref.item() > 1e-3  # a divergence of order 1, not a vacuous 0 = 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(got_g) == len(ref_g) > 0
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return ref, got


@pytest.fixture
def student():
    return tiny_causal_lm("llama", seed=11, hidden_size=32)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sglang_loss_equals_in_process(family, student, tmp_path):
    model = _teacher(family)
    engine = _Engine(_sglang_answer(model))
    try:
        teacher = SGLangTeacher(engine.url, _checkpoint(model, tmp_path), retries=0, timeout=30)
        assert teacher.head.weight.shape == (V, 48)
        _assert_same(student, teacher, model)
        path, body = engine.requests[-1]
        assert path == "/generate" and len(body["input_ids"]) == 3
        assert [len(r) for r in body["input_ids"]] == [12, 8, 9]  # only each row's real tokens are sent
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_vllm_loss_equals_in_process(family, student, tmp_path):
    model = _teacher(family)
    storage = tmp_path / "shm"
    storage.mkdir()
    engine = _Engine(_vllm_answer(model, storage, layers=2))
    try:
        teacher = VLLMTeacher(engine.url, _checkpoint(model, tmp_path), storage_path=storage,
                              server_storage_path=SERVER_DIR, layer_ids=[1, model.config.num_hidden_layers],
                              retries=0, timeout=30)
        assert teacher.model == "tiny-teacher"
        _assert_same(student, teacher, model)
        assert list(storage.iterdir()) == []  # files and locks cleaned up
    finally:
        engine.close()


def test_the_comparison_can_fail(student, tmp_path):
    """Post-norm states expected but pre-norm states served: the loss differs (the equality test is not
    vacuous, and the norm the vLLM adapter applies matters)."""
    model = _teacher("llama")
    engine = _Engine(_sglang_answer(model, post_norm=False))
    try:
        teacher = SGLangTeacher(engine.url, _checkpoint(model, tmp_path), retries=0, timeout=30)
        ids, mask, completion = _batch()
        ref, _ = _loss_and_grads(student, model, ids, mask, completion)
        got, _ = _loss_and_grads(student, teacher, ids, mask, completion)
        assert (got - ref).abs().item() > 1e-3
    finally:
        engine.close()


def test_sglang_short_prompt_block_refused(tmp_path):
    """A prefix-cache hit returning fewer states than tokens is an error, never a shifted alignment."""
    model = _teacher("llama")
    engine = _Engine(_sglang_answer(model, drop_prefix=2))
    try:
        teacher = SGLangTeacher(engine.url, _checkpoint(model, tmp_path), retries=0, timeout=30)
        with pytest.raises(TeacherRequestError, match="disable-radix-cache"):
            teacher.hidden_states(torch.randint(3, V, (2, 6)))
    finally:
        engine.close()


def test_vllm_refusals(tmp_path):
    model = _teacher("llama")
    ckpt = _checkpoint(model, tmp_path)
    storage = tmp_path / "shm"
    storage.mkdir()
    engine = _Engine(_vllm_answer(model, storage, wrong_tokens=True))
    try:
        kw = dict(storage_path=storage, server_storage_path=SERVER_DIR, retries=0, timeout=30)
        teacher = VLLMTeacher(engine.url, ckpt, **kw)
        with pytest.raises(TeacherRequestError, match="token_ids"):
            teacher.hidden_states(torch.randint(3, V, (1, 6)))
        with pytest.raises(ValueError, match="num_hidden_layers"):
            VLLMTeacher(engine.url, ckpt, layer_ids=[1], **kw)
        with pytest.raises(ValueError, match="storage_path"):
            VLLMTeacher(engine.url, ckpt, storage_path=tmp_path / "missing", retries=0)
        ids, mask = torch.randint(3, V, (2, 6)), torch.ones(2, 6, dtype=torch.long)
        mask[0, :2] = 0
        with pytest.raises(ValueError, match="trainer"):
            teacher.hidden_states(ids, mask, position_ids="trainer")
        mask[1, 3] = 0
        with pytest.raises(ValueError, match="contiguous"):
            teacher.hidden_states(ids, mask)
    finally:
        engine.close()


def test_unknown_family_refused_by_name(tmp_path):
    model = tiny_causal_lm("gpt2", seed=1, hidden_size=48)
    with pytest.raises(ValueError, match="'gpt2'"):
        SGLangTeacher("http://127.0.0.1:9", _checkpoint(model, tmp_path), retries=0)


def test_fingerprint_tracks_the_checkpoint(tmp_path):
    a = SGLangTeacher("http://127.0.0.1:9", _checkpoint(_teacher("llama", seed=3), tmp_path / "a"), retries=0)
    b = SGLangTeacher("http://127.0.0.1:9", _checkpoint(_teacher("llama", seed=3), tmp_path / "b"), retries=0)
    c = SGLangTeacher("http://127.0.0.1:9", _checkpoint(_teacher("llama", seed=4), tmp_path / "c"), retries=0)
    assert a.fingerprint == b.fingerprint != c.fingerprint
