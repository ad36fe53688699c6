"""Progress streamed to the clients that asked (``progress=true``): the protocol's lines, and the handler's
intermediate messages in-process (a recording stand-in for TorchServe's ``send_intermediate_predict_response``).
The same through a real TorchServe and curl is in ``tests/test_server_progress.py``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from unioncam import InvalidInputError
from unioncam.serve import protocol, streaming

from .fakes import FakeContext, random_png

ND = protocol.PROGRESS_TYPE


def test_the_progress_field_is_read_from_forms_and_json_and_refused_with_png():
    d = protocol.Defaults(image_size=32)
    png = random_png()
    assert protocol.parse({"image": png, "progress": b"true"}, True, d).progress is True
    assert protocol.parse({"image": png, "progress": b"false"}, True, d).progress is False
    assert protocol.parse({"image": png}, True, d).progress is False
    b64 = base64.b64encode(png).decode()
    assert protocol.parse({"body": {"image": b64, "progress": True}}, True, d).progress is True
    assert protocol.parse({"image": png, "progress": b"true"}, False, d).progress is False  # predictions: one forward
    with pytest.raises(InvalidInputError) as err:
        protocol.parse({"image": png, "progress": b"true", "format": b"png"}, True, d)
    assert err.value.field == "progress" and "format=json" in err.value.accepted
    with pytest.raises(InvalidInputError) as err:
        protocol.parse({"image": png, "progress": b"maybe"}, True, d)
    assert err.value.field == "progress" and "true or false" in err.value.accepted


def test_a_progress_line_says_done_total_percent_and_time_left():
    line = protocol.progress_line(25, 100, 2.0, "explaining")
    assert line.endswith("\n") and "\n" not in line[:-1]
    p = json.loads(line)["progress"]
    assert p == {"state": "explaining", "done": 25, "total": 100, "percent": 25.0, "elapsed_s": 2.0, "eta_s": 6.0}
    assert json.loads(protocol.progress_line(0, None, 0.1, "waiting"))["progress"]["eta_s"] is None


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    ctx = FakeContext(tmp_path_factory.mktemp("model"), [])
    ctx.model_yaml_config["handler"].update(model="shapes", explain_slots=2)
    h = UnionCAMHandler()
    h.initialize(ctx)
    return h


def test_streaming_requests_get_the_same_messages_and_the_others_one_answer(handler, monkeypatch):
    sent: list[tuple[dict[int, str], dict[int, str]]] = []
    monkeypatch.setattr("unioncam.serve.torchserve.handler.torchserve_sender",
                        lambda ctx: lambda lines, ids, c: sent.append((dict(lines), dict(ids))))
    monkeypatch.setattr(streaming, "INTERVAL_S", 0.0)  # every update a message: the test sees them all
    png = random_png()
    data = [{"image": png, "progress": b"true"},                          # streams
            {"image": png},                                               # did not ask: one answer
            {"image": png, "method": b"scorecam", "progress": b"true"},    # streams
            {"image": png, "method": b"gradcam", "progress": b"true", "format": b"png"}]  # refused: 400
    ctx = FakeContext(Path("."), [{"explain": "True"}] * 4)
    ctx.request_ids = {0: "r0", 1: "r1", 2: "r2", 3: "r3"}
    out = handler.handle(data, ctx)

    assert ctx.status == {3: 400} and out[3]["error"]["field"] == "progress"
    assert sent, "no progress message went out"
    assert all(ids == {0: "r0", 2: "r2"} and set(lines) == {0, 2} for lines, ids in sent), \
        "every message goes to every streaming request, and to no other"
    per = {i: [json.loads(lines[i])["progress"] for lines, _ in sent] for i in (0, 2)}
    answers = {i: json.loads(out[i]) for i in (0, 2)}
    assert all(isinstance(out[i], str) and out[i].count("\n") == 1 and ctx.content_type[i] == ND for i in (0, 2))
    assert isinstance(out[1], dict) and ctx.content_type[1] == "application/json" and "map" in out[1]
    # Request 0 runs first: its first line has the planned total before any forward; request 2 waits.
    first = per[0][0]
    channels = answers[0]["details"]["channels"]
    assert first["state"] == "explaining" and first["done"] == 0 and first["total"] == channels + 3
    assert per[2][0]["state"] == "waiting"
    for i in (0, 2):
        ran = answers[i]["details"]["masked_forwards"]
        running = [p for p in per[i] if p["state"] == "explaining"]
        assert running and all(p["done"] <= p["total"] for p in running)
        assert running[-1]["total"] == ran and running[-1]["done"] == ran
    assert per[0][-1]["state"] == "done"
    assert [p["done"] for p in per[0]] == sorted(p["done"] for p in per[0])


def test_without_a_sender_a_streaming_request_gets_its_answer_as_one_line(handler):
    ctx = FakeContext(Path("."), [{"explain": "True"}])
    out = handler.handle([{"image": random_png(), "method": b"gradcam", "progress": b"true"}], ctx)
    assert ctx.content_type[0] == ND and json.loads(out[0])["method"] == "gradcam"


def test_the_page_proxy_passes_each_progress_line_on_as_it_arrives(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from unioncam.serve import viewer as viewer_mod

    assert viewer_mod.PROGRESS_TYPE == protocol.PROGRESS_TYPE
    got_first = threading.Event()
    waited: list[bool] = []
    first = protocol.progress_line(0, 10, 0.0, "explaining").encode()
    last = b'{"method":"unioncam"}\n'

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", ND)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
            self.wfile.flush()
            waited.append(got_first.wait(20))  # the rest only once the client holds the first line
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    up = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k"}}))
    info = {"model": "unioncam", "max_body": 1 << 20}
    try:
        with viewer_mod.Viewer(f"http://127.0.0.1:{up.server_address[1]}", tmp_path / "key_file.json", info) as v:
            r = requests.post(v.url + "/api/explanations", data=b"x", headers={"Origin": v.url}, stream=True,
                              timeout=30)
            assert r.status_code == 200 and r.headers["Content-Type"] == ND
            lines = r.iter_lines()
            assert next(lines) + b"\n" == first
            got_first.set()
            assert next(lines) + b"\n" == last
            assert waited == [True], "the proxy held the first line back until the answer was complete"
    finally:
        up.shutdown()
        up.server_close()
