"""Sessions: `Model.session()` gives its own KV cache over the same weights."""

from __future__ import annotations

import json
import threading

import pytest

import gemma_rs
import real_model

PROMPTS = [[2] + [(i * k % 500) + 5 for i in range(1, 60)] for k in (37, 41, 43, 47)]


@pytest.fixture
def tiny(fixtures_dir) -> gemma_rs.Model:
    return gemma_rs.load(fixtures_dir / "tiny" / "tiny-gqa", max_inference_len=256, weights="f32")


def test_four_sessions_in_turns_give_the_model_alone_tokens_and_keep_their_prefixes(tiny):
    alone = [tiny.complete(p + [7], 5).token_ids for p in PROMPTS]
    sessions = [tiny.session() for _ in PROMPTS]
    assert isinstance(sessions[0], gemma_rs.Session) and "Session" in repr(sessions[0])
    for _round in range(2):
        for s, p, want in zip(sessions, PROMPTS, alone):
            c = s.complete(p + [7], 5)
            assert c.token_ids == want
    # Each kept its own sequence: a continuation of its prompt reuses it, whatever the
    # other sessions did in between.
    for s, p in zip(sessions, PROMPTS):
        assert s.complete(p + [8, 9], 2).reused_tokens == len(p)
    # The model's own session is separate too: its last call was the last of `alone`.
    assert tiny.complete(PROMPTS[-1] + [7, 1], 1).reused_tokens == len(PROMPTS[-1]) + 1


def test_sessions_on_two_threads_at_once(tiny):
    want = [tiny.complete(p, 8).token_ids for p in PROMPTS[:2]]
    sessions = [tiny.session(), tiny.session()]
    got: list[list[int] | None] = [None, None]

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = sessions[i].complete(PROMPTS[i], 8).token_ids
            sessions[i].reset()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_a_session_has_the_state_methods_and_memory_counts_it(tiny, fixtures_dir, tmp_path):
    s = tiny.session()
    s.save_state(tmp_path / "s.state", PROMPTS[0])
    t = tiny.session()
    assert t.load_state(tmp_path / "s.state") == len(PROMPTS[0])
    assert t.complete(PROMPTS[0] + [7], 1).reused_tokens == len(PROMPTS[0])
    path = fixtures_dir / "tiny" / "tiny-gqa"
    plan = lambda n: gemma_rs.memory_plan(path, 256, "f32", sessions=n)  # noqa: E731
    assert tiny.memory == plan(3)
    del s
    assert tiny.memory == plan(2)
    assert plan(2)["kv_cache"] == 2 * plan(1)["kv_cache"] > 0
    assert plan(2)["weights"] == plan(1)["weights"]
    with pytest.raises(ValueError, match="sessions"):
        plan(0)


def test_sessions_cost_their_caches_not_weights(packed_q8_0):
    """Four sessions of the real model, each prefilling 300 tokens: the process grows by about
    what they write into their caches and scratch, far below another copy of the weights."""
    code = (
        "import re, sys, json, gemma_rs\n"
        "status = lambda: open('/proc/self/status').read()\n"
        "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+) kB', status())[1])\n"
        "m = gemma_rs.load(sys.argv[1], max_inference_len=512)\n"
        "ids = [2] + [(i * 37 % 5000) + 100 for i in range(299)]\n"
        "m.complete(ids, 2)\n"
        "before = rss()\n"
        "sessions = [m.session() for _ in range(4)]\n"
        "tokens = [s.complete(ids, 2).token_ids for s in sessions]\n"
        "print(json.dumps([before, rss(), m.memory, tokens, m.complete(ids, 2).token_ids]))\n"
    )
    out = real_model.run_python(code, packed_q8_0)
    before, after, memory, tokens, alone = json.loads(out)
    assert tokens == [alone] * 4
    grown = (after - before) * 1024
    per_session = (memory["kv_cache"] + memory["scratch"]) / 5
    assert grown < 4 * per_session + 16e6, (grown, per_session)
    assert grown < 0.25 * memory["weights"]


def test_a_batch_steps_sessions_together_as_each_alone(real_model_gguf):
    """`_gemma_rs.Batch` (the server's decode loop): streams of different sessions, one of them
    a prompt longer than a prefill chunk and one seeded, stepped together give the texts each
    gives alone; a stream twice, or two streams of one session, are refused."""
    model = gemma_rs.load(real_model_gguf, max_inference_len=512)
    long = "Once upon a time " * 40  # 161 tokens: prefilled a chunk a step beside the others
    prompts = ["The capital of France is", long, "def fibonacci(n):"]
    seeded = dict(temperature=0.8, seed=3)
    options = [{}, {}, seeded]
    want = [model.generate(p, 20, **o) for p, o in zip(prompts, options)]
    sessions = [model.session() for _ in prompts]
    streams = [s.stream(p, 20, **o) for s, p, o in zip(sessions, prompts, options)]
    batch = gemma_rs._gemma_rs.Batch()
    texts, live = [""] * 3, [0, 1, 2]
    while live:
        steps = batch.step([streams[i] for i in live])
        for i, piece in zip(list(live), steps):
            assert not isinstance(piece, BaseException), piece
            if piece is None:
                live.remove(i)
            else:
                texts[i] += piece
    assert texts == want
    assert [s.completion.text for s in streams] == want
    assert streams[1].completion.prompt_tokens == len(model.tokenize(long))
    with pytest.raises(ValueError, match="twice"):
        batch.step([streams[0], streams[0]])
    one = sessions[0]
    pair = [one.stream("a", 2), one.stream("b", 2)]
    with pytest.raises(ValueError, match="own session"):
        batch.step(pair)


def test_batches_sharing_streams_in_opposite_orders_do_not_deadlock(real_model_gguf):
    """Two threads step batches of the same two streams, in opposite orders: the streams and
    their sessions are locked in one order whatever the batch's, so both threads finish."""
    import threading

    model = gemma_rs.load(real_model_gguf, max_inference_len=256)
    a, b = model.session().stream("One", 40), model.session().stream("Two", 40)
    done = []

    def run(streams):
        batch = gemma_rs._gemma_rs.Batch()
        for _ in range(30):
            batch.step(streams)
        done.append(True)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in ([a, b], [b, a])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert done == [True, True]
