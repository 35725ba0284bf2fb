"""The served teacher (opd_kernels.teacher): the remote loss equals the in-process one, and the server refuses
what it must (no token, garbage, oversize), sheds load, batches correctly, and a changed or dead server is an
error that names it. Servers bind 127.0.0.1 on a free port; every wait has a timeout."""
import http.client
import json
import os
import queue
import re
import threading
import time
import urllib.parse

import pytest
import torch

pytest.importorskip("aiohttp")

from opd_kernels import hf  # noqa: E402
from opd_kernels.hf.tiny import tiny_causal_lm  # noqa: E402
from opd_kernels.teacher import (LocalTeacher, RemoteTeacher, TeacherFingerprintError,  # noqa: E402
                                 TeacherRequestError, TeacherUnavailableError, fingerprint)
from opd_kernels.teacher.cli import spawn_server  # noqa: E402
from opd_kernels.teacher.server import TeacherServer, load_model  # noqa: E402
from opd_kernels.teacher.wire import decode, encode  # noqa: E402

TOKEN = "s3cret-token"
V = 131


def _teacher(family, seed=1):
    # a teacher wider than the student: hidden sizes differ, as they do in practice
    return tiny_causal_lm(family, seed=seed, hidden_size=48)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def served(request):
    teacher = _teacher(request.param)
    server = TeacherServer(teacher, host="127.0.0.1", port=0, token=TOKEN).start()
    yield request.param, teacher, server
    server.stop()


def _raw(server, method, path, body=None, token=TOKEN, timeout=30):
    """(status, headers, body) of one request, with the bearer token unless token is None."""
    parts = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _batch(b=3, t=12, left_pad=(0, 4, 0)):
    ids = torch.randint(0, V, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    for row, n in enumerate(left_pad[:b]):
        mask[row, :n] = 0
    loss_mask = torch.zeros(b, t, dtype=torch.long)
    loss_mask[:, t // 2:] = 1  # the completion: the second half
    return ids, mask, loss_mask


def _loss_and_grads(student, teacher, ids, mask, loss_mask, **kw):
    student.zero_grad(set_to_none=True)
    loss = hf.distillation_loss(student, teacher, ids, attention_mask=mask, loss_mask=loss_mask, **kw)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("divergence,positions", [("reverse_kl", "generate"), ("forward_kl", "trainer"),
                                                  ("jsd", "explicit")])
def test_remote_loss_and_gradients_equal_in_process(served, divergence, positions):
    family, teacher, server = served
    student = tiny_causal_lm(family, seed=5)
    ids, mask, loss_mask = _batch()
    pos = hf.position_ids_from_mask(mask) + 3 if positions == "explicit" else positions
    kw = dict(divergence=divergence, position_ids=pos, backend="torch")
    want, want_g = _loss_and_grads(student, teacher, ids, mask, loss_mask, **kw)
    assert want_g and float(want) > 1e-3  # a loss that can differ

    remote = RemoteTeacher(server.url, token=TOKEN, dtype=torch.float32)
    got, got_g = _loss_and_grads(student, remote, ids, mask, loss_mask, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_g.keys() == want_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-5, msg=n)

    bf16 = RemoteTeacher(server.url, token=TOKEN, dtype=torch.bfloat16)
    got, got_g = _loss_and_grads(student, bf16, ids, mask, loss_mask, **kw)
    assert abs(float(got) - float(want)) <= 2e-2 * max(1.0, abs(float(want)))
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=2e-2, atol=2e-2, msg=n)


def test_local_teacher_equals_the_model(served):
    family, teacher, _ = served
    student = tiny_causal_lm(family, seed=6)
    ids, mask, loss_mask = _batch()
    want = hf.distillation_loss(student, teacher, ids, attention_mask=mask, loss_mask=loss_mask)
    got = hf.distillation_loss(student, LocalTeacher(teacher), ids, attention_mask=mask, loss_mask=loss_mask)
    assert torch.equal(got, want)


def test_a_wrong_transform_would_be_seen(served):
    """The comparison above can fail: a head read with another scale gives another loss."""
    family, teacher, server = served
    student = tiny_causal_lm(family, seed=5)
    ids, mask, loss_mask = _batch()
    remote = RemoteTeacher(server.url, token=TOKEN, dtype=torch.float32)
    remote._cpu_head = remote._cpu_head._replace(scale=1.01)
    remote._heads = {}
    want = hf.distillation_loss(student, teacher, ids, attention_mask=mask, loss_mask=loss_mask)
    got = hf.distillation_loss(student, remote, ids, attention_mask=mask, loss_mask=loss_mask)
    assert abs(float(got.detach()) - float(want.detach())) > 1e-5


def test_token_required_everywhere_but_healthz(served):
    _, _, server = served
    assert _raw(server, "GET", "/healthz", token=None)[0] == 200
    body = encode({"input_ids": torch.zeros(1, 4, dtype=torch.int32)})
    for method, path, payload in (("GET", "/v1/head", None), ("POST", "/v1/hidden", body),
                                  ("GET", "/metrics", None), ("GET", "/nowhere", None)):
        for token in (None, "wrong", TOKEN + "x", ""):
            status, headers, _ = _raw(server, method, path, payload, token=token)
            assert status == 401, (method, path, token)
        assert _raw(server, method, path, payload)[0] in (200, 404)
    with pytest.raises(TeacherRequestError, match=re.escape(server.url) + ".*401"):
        RemoteTeacher(server.url)
    with pytest.raises(TeacherRequestError, match="401"):
        RemoteTeacher(server.url, token="wrong")


def _post(server, tensors, metadata=None, **kw):
    return _raw(server, "POST", "/v1/hidden", encode(tensors, metadata), **kw)


def test_malformed_requests_get_400_and_the_server_keeps_serving(served):
    _, _, server = served
    ids = torch.randint(0, V, (2, 6))
    cases = [
        (b"not safetensors at all", "safetensors"),
        (b"\xff" * 8 + b"{}", "header length"),
        (encode({"ids": ids}), "unexpected tensors"),
        (encode({"input_ids": ids.float()}), "integer"),
        (encode({"input_ids": ids[0]}), "(B, T)"),
        (encode({"input_ids": torch.zeros(2, 0, dtype=torch.long)}), "non-empty"),
        (encode({"input_ids": ids + V}), "outside the teacher's vocabulary"),
        (encode({"input_ids": ids - 200}), "outside"),
        (encode({"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}), "attention_mask"),
        (encode({"input_ids": ids, "attention_mask": 2 * torch.ones(2, 6, dtype=torch.long)}), "0 or 1"),
        (encode({"input_ids": ids, "lengths": torch.tensor([0, 6])}), "lengths"),
        (encode({"input_ids": ids, "lengths": torch.tensor([3, 7])}), "lengths"),
        (encode({"input_ids": ids, "lengths": torch.tensor([3, 6]), "attention_mask": torch.ones(2, 6)}), "not both"),
        (encode({"input_ids": ids}, {"positions": "explicit"}), "position_ids"),
        (encode({"input_ids": ids}, {"positions": "sideways"}), "positions"),
        (encode({"input_ids": ids, "position_ids": -torch.ones(2, 6, dtype=torch.long)}, {"positions": "explicit"}),
         "negative"),
        (encode({"input_ids": ids}, {"dtype": "float64"}), "dtype"),
        (encode({"input_ids": ids}, {"exec": "print(1)"}), "unexpected metadata"),
        (encode({"input_ids": ids}, {"protocol": "other/9"}), "protocol"),
    ]
    for body, words in cases:
        status, _, text = _raw(server, "POST", "/v1/hidden", body)
        assert status == 400, (words, status, text)
        assert words in text.decode(), (words, text)
    # lengths (right padding) are accepted and equal a mask
    a = _post(server, {"input_ids": ids, "lengths": torch.tensor([4, 6])})
    b = _post(server, {"input_ids": ids, "attention_mask": torch.tensor([[1] * 4 + [0] * 2, [1] * 6])})
    assert a[0] == b[0] == 200
    assert torch.equal(decode(a[2])[0]["hidden"], decode(b[2])[0]["hidden"])
    assert _raw(server, "GET", "/healthz")[0] == 200


def test_oversize_requests_get_413_and_the_server_keeps_serving():
    teacher = _teacher("llama")
    with TeacherServer(teacher, port=0, max_request_tokens=64) as server:
        ok = torch.randint(0, V, (4, 16))
        assert _post(server, {"input_ids": ok}, token=None)[0] == 200
        status, _, text = _post(server, {"input_ids": torch.randint(0, V, (5, 16))}, token=None)
        assert status == 413 and b"max-request-tokens" in text
        status, _, text = _raw(server, "POST", "/v1/hidden", b"\0" * (64 * 24 + 64 * 1024 + 1), token=None)
        assert status == 413, text
        assert _post(server, {"input_ids": ok}, token=None)[0] == 200
        client = RemoteTeacher(server.url)  # splits a batch by rows to fit the server's limit
        big = torch.randint(0, V, (9, 16))
        with torch.no_grad():
            want = hf.hidden_states(teacher, big)
        torch.testing.assert_close(client.hidden_states(big), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="max-request-tokens"):
            client.hidden_states(torch.randint(0, V, (1, 65)))


def test_concurrent_clients_get_their_own_answers():
    """16 clients x 4 requests of different shapes, masks and position modes: every answer is its own request's
    hidden states (batching pads and slices correctly), and requests were batched."""
    teacher = _teacher("qwen2")
    server = TeacherServer(teacher, port=0, token=TOKEN, max_batch_tokens=512).start()
    try:
        client = RemoteTeacher(server.url, token=TOKEN, dtype=torch.float32, timeout=60)
        errors, done = [], []

        def work(k):
            gen = torch.Generator().manual_seed(k)
            try:
                for i in range(4):
                    b, t = 1 + (k + i) % 3, 5 + (7 * k + i) % 11
                    ids = torch.randint(0, V, (b, t), generator=gen)
                    mask = torch.ones(b, t, dtype=torch.long)
                    mask[0, :(k % 3)] = 0
                    mode = ("generate", "trainer")[(k + i) % 2]
                    got = client.hidden_states(ids, mask, position_ids=mode)
                    with torch.no_grad():
                        want = hf.hidden_states(teacher, ids, mask, position_ids=mode)
                    real = mask.bool()
                    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
                done.append(k)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"client {k}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(16)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 120
        for th in threads:
            th.join(max(0.1, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in threads), "clients still running after 120 s"
        assert not errors, errors
        assert len(done) == 16
        m = server.metrics
        assert m.requests[("/v1/hidden", 200)] == 64
        assert m.batches < 64, "no two requests were ever batched"
        assert m.queue_depth == 0 and m.in_flight == 0
    finally:
        server.stop()


def test_batching_off_runs_one_request_per_forward():
    with TeacherServer(_teacher("llama"), port=0, batching=False) as server:
        client = RemoteTeacher(server.url)
        threads = [threading.Thread(target=client.hidden_states, args=(torch.randint(0, V, (2, 8)),), daemon=True)
                   for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert server.metrics.batches == server.metrics.requests[("/v1/hidden", 200)] == 6


def test_full_queue_answers_503_with_retry_after():
    teacher = _teacher("llama")
    server = TeacherServer(teacher, port=0, max_queue=1).start()
    gate, entered = threading.Event(), threading.Event()
    forward = server._forward

    def slow_forward(batch):
        entered.set()
        gate.wait(30)
        return forward(batch)

    server._forward = slow_forward
    try:
        body = encode({"input_ids": torch.randint(0, V, (1, 8))})
        results = queue.Queue()
        first = threading.Thread(target=lambda: results.put(_raw(server, "POST", "/v1/hidden", body, None)[0]),
                                 daemon=True)
        first.start()
        assert entered.wait(30)  # the first request is in the model
        second = threading.Thread(target=lambda: results.put(_raw(server, "POST", "/v1/hidden", body, None)[0]),
                                  daemon=True)
        second.start()
        deadline = time.monotonic() + 30
        while len(server._pending) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, text = _raw(server, "POST", "/v1/hidden", body, None)
        assert status == 503 and headers.get("Retry-After") == "1", (status, headers, text)
        client = RemoteTeacher(server.url, retries=1, backoff=0.01, max_backoff=0.01)
        with pytest.raises(TeacherUnavailableError, match=re.escape(server.url) + ".*2 attempts.*503"):
            client.hidden_states(torch.randint(0, V, (1, 8)))
        gate.set()
        first.join(30)
        second.join(30)
        assert [results.get(timeout=1), results.get(timeout=1)] == [200, 200]
        assert server.metrics.rejected_full >= 3
        assert _post(server, {"input_ids": torch.randint(0, V, (1, 8))}, token=None)[0] == 200
    finally:
        gate.set()
        server.stop()


def test_server_restarted_with_other_weights_is_a_fingerprint_error():
    teacher = _teacher("llama", seed=1)
    server = TeacherServer(teacher, port=0).start()
    port = server.port
    client = RemoteTeacher(server.url, retries=20, backoff=0.05, max_backoff=0.2)
    ids = torch.randint(0, V, (2, 8))
    client.hidden_states(ids)
    server.stop()
    # the same weights again (a restart): the client reconnects and carries on
    server = TeacherServer(_teacher("llama", seed=1), port=port).start()
    try:
        client.hidden_states(ids)
    finally:
        server.stop()
    other = TeacherServer(_teacher("llama", seed=2), port=port).start()
    try:
        with pytest.raises(TeacherFingerprintError, match=re.escape(server.url) + ".*another teacher"):
            client.hidden_states(ids)
    finally:
        other.stop()


def test_killed_server_fails_fast_naming_the_url():
    server = TeacherServer(_teacher("llama"), port=0).start()
    client = RemoteTeacher(server.url, timeout=5, retries=2, backoff=0.05)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=re.escape(server.url) + "/v1/hidden.*3 attempts"):
        client.hidden_states(torch.randint(0, V, (1, 4)))
    assert time.monotonic() - t0 < 5
    with pytest.raises(TeacherUnavailableError, match=re.escape(server.url)):
        RemoteTeacher(server.url, retries=0)


def test_transport_dtype_default_and_per_request():
    teacher = _teacher("llama")
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        want = hf.hidden_states(teacher, ids)
    with TeacherServer(teacher, port=0, transport_dtype=torch.bfloat16) as server:
        status, _, body = _post(server, {"input_ids": ids}, token=None)
        tensors, meta = decode(body)
        assert status == 200 and tensors["hidden"].dtype == torch.bfloat16 and meta["dtype"] == "bfloat16"
        assert RemoteTeacher(server.url).dtype == torch.bfloat16
        exact = RemoteTeacher(server.url, dtype="float32")
        torch.testing.assert_close(exact.hidden_states(ids), want, rtol=1e-6, atol=1e-6)
        rounded = RemoteTeacher(server.url).hidden_states(ids)
        assert rounded.dtype == torch.float32 and torch.equal(rounded, want.to(torch.bfloat16).float())


def test_fingerprint_tracks_weights_config_and_dtype():
    a, b = _teacher("llama", seed=1), _teacher("llama", seed=1)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(_teacher("llama", seed=1).to(torch.bfloat16))
    c = _teacher("llama", seed=1)
    c.config.rope_theta = 1234.0
    assert fingerprint(a) != fingerprint(c)


def test_metrics_are_prometheus_text(served):
    _, _, server = served
    _post(server, {"input_ids": torch.randint(0, V, (2, 5))})
    status, headers, body = _raw(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for name in ("opd_teacher_requests_total", "opd_teacher_tokens_total", "opd_teacher_batch_tokens_bucket",
                 "opd_teacher_request_seconds_count", "opd_teacher_queue_depth"):
        assert name in text
    assert re.search(r'opd_teacher_requests_total\{endpoint="/v1/hidden",code="200"\} [1-9]', text)


def test_load_model_refuses_what_it_must_not_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")  # a pickle: never loaded
    with pytest.raises(ValueError, match="safetensors only"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="not a folder"):
        load_model(str(tmp_path / "missing"))


@pytest.mark.slow
def test_cli_serve_end_to_end(tmp_path):
    """`opd-teacher serve` with a token on loopback, as a user runs it: 401 without the token, 400 for garbage,
    the loss of RemoteTeacher equal to the in-process teacher's, and a fast, named failure once it is killed."""
    teacher = _teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher", safe_serialization=True)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    # the default transport is bfloat16; the model computes in its checkpoint's float32
    proc, url = spawn_server(str(tmp_path / "teacher"), "--token-file", str(token_file))
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        server = type("Served", (), {"url": url})
        assert _raw(server, "GET", "/v1/head", token=None)[0] == 401
        assert _raw(server, "POST", "/v1/hidden", b"garbage")[0] == 400
        assert _raw(server, "GET", "/healthz", token=None)[0] == 200
        student = tiny_causal_lm("llama", seed=5)
        ids, mask, loss_mask = _batch()
        loaded = load_model(str(tmp_path / "teacher"), dtype="float32", device="cpu")
        want, want_g = _loss_and_grads(student, loaded, ids, mask, loss_mask)
        got, got_g = _loss_and_grads(student, RemoteTeacher(url, token=TOKEN, dtype=torch.float32), ids, mask,
                                     loss_mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-5)
        default = RemoteTeacher(url, token=TOKEN)
        assert default.dtype == torch.bfloat16 and default.compute_dtype == torch.float32
        got, got_g = _loss_and_grads(student, default, ids, mask, loss_mask)
        assert 0 < abs(float(got) - float(want)) <= 2e-2 * max(1.0, abs(float(want)))  # rounded, not equal
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=2e-2, atol=2e-2)
        client = RemoteTeacher(url, token=TOKEN, retries=2, backoff=0.05)
        proc.kill()
        proc.wait(30)
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailableError, match=re.escape(url)):
            hf.distillation_loss(student, client, ids, attention_mask=mask, loss_mask=loss_mask)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
