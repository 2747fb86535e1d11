"Description generator against a real local OpenAI-compatible HTTP server behind litellm (offline), plus file formats."
import base64, functools, io, json, logging, os, subprocess, threading
import pytest
from PIL import Image

from openai_stub import StubOpenAI, good_reply, image_urls, user_text
import spa_toolkit.descriptions as descriptions_module
from spa_toolkit.core import SpaError
from spa_toolkit.descriptions import (DescribeResult, describe_benchmark, describe_classes, describe_run,
                                      load_area_descriptions, load_descriptions, save_descriptions,
                                      template_descriptions)

KEY = "sk-test-secret"
IMAGES = {"fox": [Image.new("RGB", (300, 150), "red"), Image.new("RGB", (64, 64), "orange")],
          "wolf": [Image.new("RGB", (64, 64), "grey")], "bear": [Image.new("L", (50, 80), 90)]}

@pytest.fixture(scope="module")
def server():
    with StubOpenAI() as s: yield s

@pytest.fixture
def stub(server):
    server.reset()
    yield server
    server.reset()

def run(stub, names=("fox",), **kw):
    "describe_run against the stub with fast test settings (overridable)."
    kw = dict(model="openai/test", api_base=stub.api_base, api_key=KEY, max_retries=2, backoff=0.01, timeout=5) | kw
    return describe_run(list(names), {c: IMAGES[c] for c in names}, **kw)

def test_request_carries_images_and_reply_is_parsed(stub, tmp_path):
    res = run(stub, cache_dir=tmp_path, max_side=100)
    assert isinstance(res, DescribeResult)
    assert res.descriptions == {"fox": json.loads(good_reply("fox", 0)[1])["descriptions"]}
    (req,) = stub.requests
    urls = image_urls(req["body"])
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in urls]
    assert sizes == [(100, 50), (64, 64)]  # downsized to max_side, never upsized
    assert req["body"]["response_format"] == {"type": "json_object"}
    assert {k.lower(): v for k, v in req["headers"].items()}["authorization"] == f"Bearer {KEY}"
    assert res.usage["fox"].prompt_tokens == 100 and res.usage["fox"].calls == 1 and res.cached == []

def test_text_only_sends_no_images(stub):
    descs = describe_classes(["fox"], IMAGES, model="openai/test", api_base=stub.api_base, api_key=KEY, text_only=True)
    assert image_urls(stub.requests[0]["body"]) == [] and list(descs) == ["fox"]
    assert "images below" not in user_text(stub.requests[0]["body"])

def test_garbage_reply_is_retried_then_reported(stub):
    stub.reply = lambda c, a: (200, "Foxes are small omnivores with red fur.")
    with pytest.raises(SpaError, match=r"no usable descriptions for class 'fox' after 3 attempts"):
        run(stub)
    assert len(stub.requests) == 3

def test_garbage_then_good_reply_recovers(stub):
    stub.reply = lambda c, a: (200, '{"descriptions": ["red fur", ') if a == 0 else good_reply(c, a)
    res = run(stub)
    assert res.usage["fox"].calls == 2 and len(res.descriptions["fox"]) == 8

def record_sleeps(monkeypatch) -> list[float]:
    "The waits between retries, recorded instead of slept."
    waits = []
    monkeypatch.setattr(descriptions_module, "ask_descriptions", functools.partial(descriptions_module.ask_descriptions, sleep=waits.append))
    return waits

def test_rate_limit_is_retried_with_backoff(stub, monkeypatch):
    waits = record_sleeps(monkeypatch)
    stub.reply = lambda c, a: (429, "rate limit, slow down") if a < 2 else good_reply(c, a)
    res = run(stub, backoff=0.1)
    assert waits == [0.1, 0.2]  # backoff, then 2 * backoff
    assert len(stub.requests) == 3 and res.usage["fox"].calls == 1

def test_timeout_is_retried(stub, monkeypatch):
    waits, second = record_sleeps(monkeypatch), threading.Event()
    def held(c, a):  # the first request is held until the retry arrives, which only a client timeout can cause
        if a == 0: second.wait(10)
        else: second.set()
        return good_reply(c, a)
    stub.reply = held
    res = run(stub, timeout=0.3)
    assert len(stub.requests) == 2 and len(res.descriptions["fox"]) == 8 and waits == [0.01]

def test_bad_key_fails_at_once_naming_class_and_fix(stub):
    stub.reply = lambda c, a: (401, f"Incorrect API key provided: {KEY}")
    with pytest.raises(SpaError, match=r"'fox'.*API key") as e:
        run(stub)
    assert len(stub.requests) == 1  # not retried
    assert KEY not in str(e.value)

def test_second_call_is_a_cache_hit(stub, tmp_path):
    first = run(stub, names=("fox", "wolf"), cache_dir=tmp_path)
    n = len(stub.requests)
    second = run(stub, names=("fox", "wolf"), cache_dir=tmp_path)
    assert len(stub.requests) == n == 2
    assert second.descriptions == first.descriptions and second.cached == ["fox", "wolf"] and second.total.calls == 0

def test_other_images_or_model_miss_the_cache(stub, tmp_path):
    run(stub, cache_dir=tmp_path)
    describe_run(["fox"], {"fox": IMAGES["fox"][:1]}, model="openai/test", api_base=stub.api_base, api_key=KEY, cache_dir=tmp_path)
    run(stub, cache_dir=tmp_path, model="openai/other")
    assert len(stub.requests) == 3 and len(list(tmp_path.glob("*.json"))) == 3

def test_interrupted_run_resumes_asking_only_missing_class(stub, tmp_path):
    names = ("fox", "wolf", "bear")
    stub.reply = lambda c, a: (500, "backend down") if c == "wolf" else good_reply(c, a)
    with pytest.raises(SpaError, match=r"1 class\(es\) failed: \['wolf'\] \(2 finished classes are cached.*'wolf'"):
        run(stub, names=names, cache_dir=tmp_path, max_retries=1)
    assert sorted(p.name.split(".")[0] for p in tmp_path.glob("*.json")) == ["bear", "fox"]
    stub.reset()
    res = run(stub, names=names, cache_dir=tmp_path)
    assert stub.classes_asked() == ["wolf"]
    assert list(res.descriptions) == list(names) and sorted(res.cached) == ["bear", "fox"]

def test_corrupt_cache_file_is_reported_and_recomputed(stub, tmp_path, caplog):
    run(stub, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text(path.read_text()[:40])
    with caplog.at_level(logging.WARNING, logger="spa_toolkit.descriptions"):
        res = run(stub, cache_dir=tmp_path)
    assert "ignoring corrupt description cache" in caplog.text and len(stub.requests) == 2 and res.cached == []
    assert json.loads(path.read_text())["descriptions"] == res.descriptions["fox"]  # rewritten whole

def test_concurrency_is_bounded(stub):
    lock, state, pair = threading.Lock(), {"now": 0, "max": 0}, threading.Barrier(2, timeout=10)
    def slow(c, a):
        with lock: state["now"] += 1; state["max"] = max(state["max"], state["now"])
        pair.wait()  # requests in flight meet two by two: a third at once would be counted above
        with lock: state["now"] -= 1
        return good_reply(c, a)
    stub.reply = slow
    names = [f"class {i}" for i in range(6)]
    describe_run(names, None, model="openai/test", api_base=stub.api_base, api_key=KEY, concurrency=2)
    assert state["max"] == 2 and len(stub.requests) == 6

def test_api_key_never_in_cache_logs_or_results(stub, tmp_path, caplog):
    stub.reply = lambda c, a: (500, "upstream busy") if c == "wolf" and a == 0 else good_reply(c, a)
    out = tmp_path / "descriptions.json"
    with caplog.at_level(logging.DEBUG):  # every logger, litellm's included
        res = describe_benchmark(["fox", "wolf"], IMAGES, out, model="openai/test", api_base=stub.api_base, api_key=KEY,
                                 backoff=0.01, timeout=5)
    assert "upstream busy" in caplog.text and "prompt + " in caplog.text  # the retry and the token usage were logged
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 3 and all(KEY not in p.read_text() for p in files)
    assert KEY not in caplog.text and KEY not in repr(res) and KEY not in res.summary()

def test_api_key_echoed_by_provider_is_masked_in_our_logs(stub, caplog):
    stub.reply = lambda c, a: (500, f"upstream rejected key {KEY}")
    with caplog.at_level(logging.WARNING, logger="spa_toolkit.descriptions"), pytest.raises(SpaError) as e:
        run(stub, max_retries=1)
    ours = [r.getMessage() for r in caplog.records if r.name == "spa_toolkit.descriptions"]
    assert len(ours) == 2 and all("rejected key ***" in m and KEY not in m for m in ours)
    assert "rejected key ***" in str(e.value) and KEY not in str(e.value)

def test_mock_response_fenced_json(tmp_path):
    descs = describe_classes(["fox"], None, model="openai/mock", mock_response='```json\n{"descriptions": ["red fur", "Red fur"]}\n```')
    assert descs == {"fox": ["red fur"]}

def test_bad_inputs():
    with pytest.raises(SpaError, match="no exemplar images for classes \\['wolf'\\]"):
        describe_run(["fox", "wolf"], {"fox": IMAGES["fox"]}, model="openai/mock", mock_response="[]")
    with pytest.raises(SpaError, match="distinct non-empty strings"):
        describe_run(["fox", "fox"], None, model="openai/mock", mock_response="[]")
    with pytest.raises(SpaError, match="not a PIL image"):
        describe_run(["fox"], {"fox": ["fox.jpg"]}, model="openai/mock", mock_response="[]")

ENGINE = {"fox": {"fox": ["red fur", "bushy tail"], "wolf": ["smaller body", "Red fur."]}, "wolf": {"fox": ["grey coat"], "wolf": ["grey coat", "long legs"]}}

def test_engine_and_our_format_round_trip(tmp_path):
    (tmp_path / "engine.json").write_text(json.dumps(ENGINE))
    pooled = load_descriptions(tmp_path / "engine.json")
    assert pooled == {"fox": ["red fur", "bushy tail", "smaller body"], "wolf": ["grey coat", "long legs"]}
    ours = save_descriptions(tmp_path / "ours.json", pooled, model="engine")
    assert json.loads(ours.read_text())["format"] == "spa_toolkit.descriptions"
    assert load_descriptions(ours) == pooled
    tmpl = template_descriptions(["fox"], ["a photo of a {}.", "art of the {}."])
    assert load_descriptions(save_descriptions(tmp_path / "t.json", tmpl, model="template")) == tmpl

@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"format": "other.tool", "version": 3, "descriptions": {}}), "unknown format 'other.tool'"),
    (json.dumps({"format": "spa_toolkit.descriptions", "version": 1, "descriptions": {"fox": []}}), "class 'fox' must map"),
    (json.dumps({"fox": {"wolf": "red fur"}}), "class 'fox/wolf' must map"),
    (json.dumps(["red fur"]), "non-empty {class: [phrases]} object"),
    (json.dumps({"fox": ["red fur", 3]}), "class 'fox' must map"),
])
def test_malformed_file_gets_clear_error(tmp_path, content, message):
    path = tmp_path / "d.json"; path.write_text(content)
    with pytest.raises(SpaError, match=str(path).replace(".", r"\.")) as e:
        load_descriptions(path)
    assert message in str(e.value)

def test_key_from_environment_is_used_and_masked(stub, monkeypatch):
    env_key = "sk-env-only-secret"
    monkeypatch.setenv("OPENAI_API_KEY", env_key)
    stub.reply = lambda c, a: (401, f"Incorrect API key provided: {env_key}")
    with pytest.raises(SpaError) as e:
        describe_run(["fox"], None, model="openai/test", api_base=stub.api_base, max_retries=0)
    assert {k.lower(): v for k, v in stub.requests[0]["headers"].items()}["authorization"] == f"Bearer {env_key}"
    assert env_key not in str(e.value) and "***" in str(e.value)


# --- AREA's description files (its authors' format) ------------------------------------------------------------------------------

def test_description_files_in_the_authors_format(tmp_path):
    f = tmp_path / "generated_descriptions"
    f.mkdir()
    (f / "aquarium_fish_descriptions.txt").write_text("train_00010.png\tAn orange fish.\n\ntrain_00011.png\tA striped fish.\n")
    (f / "Boeing 717_descriptions.txt").write_text("a.jpg\tA twin-engine jet.\n")  # the _aug folders keep spaces
    (f / "F_A-18_descriptions.txt").write_text("b.jpg\tA fighter.\n")  # "/" written as "_"
    (f / "004.Groove_billed_Ani_descriptions.txt").write_text("c.jpg\tA black bird.\n")  # CUB's numbered folders
    got = load_area_descriptions(f, ["aquarium fish", "Boeing 717", "F/A-18", "Groove billed Ani"])
    assert got["aquarium fish"] == ["train_00010.png\tAn orange fish.", "train_00011.png\tA striped fish."]
    assert got["Boeing 717"] == ["a.jpg\tA twin-engine jet."] and got["F/A-18"] == ["b.jpg\tA fighter."]
    assert load_area_descriptions(f, ["Groove billed Ani"], keep_file=False) == {"Groove billed Ani": ["A black bird."]}
    with pytest.raises(SpaError, match="no whale_descriptions.txt for class 'whale'.*generated_descriptions folder"):
        load_area_descriptions(f, ["whale"])
    for bad in ("train_1.png An apple, no tab\n", "train_1.png\t\n", "\tA sentence without its image\n", "\n"):
        (f / "apple_descriptions.txt").write_text(bad)
        with pytest.raises(SpaError) as e: load_area_descriptions(f, ["apple"])
        assert ("apple_descriptions.txt:1: expected '<image file><TAB><sentence>'" in str(e.value)
                and "regenerate the file" in str(e.value)) or "holds no description" in str(e.value), str(e.value)
        assert "\n" not in str(e.value)  # one line


MIRROR = "/work/.mirror/LAMDA-CL+ICML2026-AREA/repo"


@pytest.mark.skipif(not os.path.isdir(MIRROR), reason="the authors' repository is not mirrored here")
def test_the_authors_own_files_load(tmp_path):
    "Two real files of the authors' CIFAR-100 folder and one of Aircraft's _aug folder, read from the mirror."
    for path in ("descriptions/cifar100/generated_descriptions/apple_descriptions.txt",
                 "descriptions/cifar100/generated_descriptions/aquarium_fish_descriptions.txt",
                 "descriptions/Aircraft/generated_descriptions_aug/Boeing 717_descriptions.txt"):
        text = subprocess.run(["git", "-C", MIRROR, "show", f"HEAD:{path}"], capture_output=True, text=True, check=True).stdout
        (tmp_path / path.rsplit("/", 1)[1]).write_text(text)
    got = load_area_descriptions(tmp_path, ["apple", "aquarium fish", "Boeing 717"])
    assert len(got["apple"]) == 500 and got["apple"][0].startswith("train_00002.png\tA glossy deep-red apple")
    assert len(got["Boeing 717"]) >= 1
