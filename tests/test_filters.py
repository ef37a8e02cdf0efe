"""Payload filters: parsing (JSON and --where), validation, the store's indexed
evaluation and filtered search, all against brute force (seeded random filters x
random queries); listing / scrolling / counting; concurrent writers."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.filters import (
    AnyOf,
    Bool,
    Exists,
    Literal,
    Match,
    Range,
    as_filter,
    bind,
    matches,
    parse_filter,
    parse_where,
    to_json,
)
from galleria.filters.values import field_values, parse_date
from galleria.store.filtered import filtered_topk, search_filtered
from galleria.store.gallery import Gallery
from galleria.store.payloads import infer_columns
from galleria.validate import l2_normalize

LABELS = ["cat", "dog", "bird", "fish", "2010"]
TAGS = ["a", "b", "c", "d", "e", "f"]


def _meta(rng: np.random.Generator, i: int) -> dict:
    m: dict = {"label": LABELS[int(rng.integers(len(LABELS)))]}
    if rng.random() < 0.9:
        m["year"] = int(rng.integers(1990, 2021))
    if rng.random() < 0.7:
        m["tags"] = sorted({TAGS[int(t)] for t in rng.integers(0, len(TAGS), rng.integers(0, 4))})
    if rng.random() < 0.8:
        m["taken"] = f"20{int(rng.integers(10, 24))}-{int(rng.integers(1, 13)):02d}-" \
                     f"{int(rng.integers(1, 29)):02d}"
    if rng.random() < 0.5:
        m["ok"] = bool(rng.random() < 0.5)
    if rng.random() < 0.5:
        m["score"] = round(float(rng.random()), 3)
    m["path"] = f"/images/{i}.jpg"  # never a payload
    return m


def _leaf(rng: np.random.Generator):
    r = int(rng.integers(9))
    if r == 0:
        return Match("label", LABELS[int(rng.integers(len(LABELS)))])
    if r == 1:
        return AnyOf("tags", tuple(TAGS[int(t)] for t in rng.choice(6, 2, replace=False)))
    if r == 2:
        lo = int(rng.integers(1990, 2020))
        return Range("year", gte=float(lo), lt=float(lo + int(rng.integers(1, 15))))
    if r == 3:
        return Range("score", gt=float(rng.random()))
    if r == 4:
        lo = f"20{int(rng.integers(10, 24))}-06-01"
        return Range("taken", kind="date", gte=parse_date(lo), text=(("gte", lo),))
    if r == 5:
        return Match("ok", bool(rng.random() < 0.5))
    if r == 6:
        return Exists("score")
    if r == 7:
        return Match("tags", TAGS[int(rng.integers(6))])
    return Match("year", float(rng.integers(1990, 2021)))


def _random_filter(rng: np.random.Generator, depth: int = 0):
    if depth >= 2 or rng.random() < 0.35:
        return _leaf(rng)
    parts = {}
    for name in ("must", "should", "must_not"):
        if rng.random() < 0.6:
            parts[name] = tuple(_random_filter(rng, depth + 1)
                                for _ in range(int(rng.integers(1, 3))))
    return Bool(**parts)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = np.random.default_rng(7)
    n, d = 1500, 24
    x = l2_normalize(rng.standard_normal((n, d)).astype(np.float32))
    metas = [_meta(rng, i) for i in range(n)]
    path = tmp_path_factory.mktemp("filters") / "g"
    g = Gallery.create(path)
    ids = [f"item{i:05d}" for i in range(n)]
    for s in range(0, n, 500):  # several commits: a base and a delta in the view
        g.add(ids[s : s + 500], x[s : s + 500], space="sp", meta=metas[s : s + 500])
    g.save_index("sp")
    g.remove(ids[:20])  # tombstones in the view
    alive = np.arange(20, n)
    yield g, x, metas, ids, alive
    g.close()


def _brute(x, metas, alive, f, q, k):
    vals = _values(metas)
    ok = np.array([i for i in alive if matches(f, metas[i], values=vals[i])], np.int64)
    if ok.size == 0:
        return np.zeros((len(q), 0)), np.zeros((len(q), 0), np.int64)
    s = q @ x[ok].T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), ok[order]


_CACHE: dict[int, list] = {}


def _values(metas):
    if id(metas) not in _CACHE:
        _CACHE[id(metas)] = [field_values(m) for m in metas]
    return _CACHE[id(metas)]


# ------------------------------------------------------------------ parsing
def test_json_and_compact_forms_parse_to_the_same_filter():
    j = parse_filter({"must": [{"key": "label", "match": "cat"},
                               {"key": "year", "range": {"gte": 2000, "lt": 2010}}],
                      "must_not": [{"key": "tags", "any": ["a", "b"]}]})
    c = parse_where(["label=cat", "year>=2000", "year<2010", "tags!=a,b"])
    fields = {"label": {"string": 1}, "year": {"number": 1}, "tags": {"string": 1}}
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = _meta(rng, 0)
        assert matches(bind(j, fields), m) == matches(bind(c, fields), m)
    assert parse_filter(to_json(j)) == j
    short = parse_filter({"label": "cat", "year": {"gte": 2000}, "tags": ["a", "b"]})
    assert short == Bool(must=(Match("label", "cat"), Range("year", gte=2000.0),
                               AnyOf("tags", ("a", "b"))))
    assert parse_where("year=2000..2010") == Range("year", gte=2000.0, lte=2010.0)
    assert parse_where("label=cat OR year<2000") == Bool(should=(
        Match("label", Literal("cat")), Range("year", lt=2000.0)))
    assert parse_where('label="a, b",c') == AnyOf("label", ("a, b", Literal("c")))
    r = parse_where("taken>=2021-05-01")
    assert r.kind == "date" and r.gte == parse_date("2021-05-01")


@pytest.mark.parametrize("bad, words", [
    ({"key": "x"}, "exactly one of"),
    ({"key": "x", "match": 1, "range": {"gt": 1}}, "exactly one of"),
    ({"key": "x", "mtach": 1}, "unknown words ['mtach']"),
    ({"must": [], "shuold": []}, "unknown words ['shuold']"),
    ({"key": "x", "range": {"gt": "yesterday"}}, "neither a number nor an ISO date"),
    ({"key": "x", "range": {"gt": 1, "lt": "2021-01-01"}}, "mixes numbers and dates"),
    ({"key": "x", "any": []}, "non-empty list"),
    ({"key": "x", "match": [1, 2]}, "a value must be"),
    ({"key": "", "match": 1}, "non-empty field name"),
    ([1], "expected a JSON object"),
])
def test_bad_json_filters_say_what_is_wrong(bad, words):
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_filter(bad)


@pytest.mark.parametrize("bad, words", [
    ("label", "no operator"), ("=cat", "expected FIELD"), ("year>=", "no value"),
    ("year>=soon", "neither a number nor an ISO date"), ("label=a,,b", "empty value"),
])
def test_bad_compact_filters_say_what_is_wrong(bad, words):
    with pytest.raises(InputError, match=words):
        parse_where(bad)


def test_bind_checks_fields_and_types_and_types_literals():
    fields = {"label": {"string": 3}, "year": {"number": 3}, "ok": {"bool": 2},
              "code": {"string": 1, "number": 2}}
    with pytest.raises(InputError, match="did you mean 'label'"):
        bind(parse_where("lable=cat"), fields)
    with pytest.raises(InputError, match=r"holds number values, not strings.*without quotes"):
        bind(parse_filter({"key": "year", "match": "2010"}), fields)
    with pytest.raises(InputError, match="range on 'label' needs numbers"):
        bind(parse_where("label>3"), fields)
    with pytest.raises(InputError, match="'abc' is not one"):
        bind(parse_where("year=abc"), fields)
    assert bind(parse_where("year=2010"), fields) == Match("year", 2010.0)
    assert bind(parse_where("ok=true"), fields) == Match("ok", True)
    assert bind(parse_where("code=7"), fields) == AnyOf("code", (7.0, "7"))


def test_typed_values_rules():
    fields = {"a": {"bool": 1, "number": 1}}
    assert matches(bind(Match("a", True), fields), {"a": True})
    assert not matches(bind(Match("a", True), fields), {"a": 1})  # true is not 1
    assert not matches(bind(Match("a", 1.0), fields), {"a": True})
    assert matches(Match("d", "2021-05-01"), {"d": "2021-05-01"})  # a date equals its text
    assert matches(Range("n.x", gte=3.0), {"n": {"x": 4}})  # objects: dotted fields
    assert not matches(Exists("t"), {"t": []}) and not matches(Exists("t"), {"t": None})
    assert not matches(Exists("path"), {"path": "/x.jpg"})  # the image path is not a payload


def test_manifest_columns_are_typed():
    rows = [{"year": "2010", "ok": "TRUE", "code": "007", "tags:list": "a|b", "w": "1.5",
             "when:date": "2021-05-01", "label": "cat"},
            {"year": "", "ok": "false", "code": "12", "tags:list": "", "w": "2",
             "when:date": "", "label": "7"}]
    cols = infer_columns(rows)
    assert cols.apply(rows[0]) == {"year": 2010, "ok": True, "code": "007", "tags": ["a", "b"],
                                   "w": 1.5, "when": "2021-05-01", "label": "cat"}
    assert cols.apply(rows[1]) == {"ok": False, "code": "12", "tags": [], "w": 2,
                                   "when": "", "label": "7"}
    with pytest.raises(InputError, match="'x' is not a number"):
        infer_columns([{"n:number": "x"}])


# ------------------------------------------------------------ against brute force
def test_store_evaluation_equals_the_reference_evaluator(world):
    g, _x, metas, ids, alive = world
    fields = g.payload_fields()
    rng = np.random.default_rng(11)
    nonempty = 0
    keys = g.keys_of([ids[i] for i in alive])
    for _ in range(200):
        f = bind(_random_filter(rng), fields)
        got = g.match_keys(f)
        vals = _values(metas)
        want = np.sort(keys[[matches(f, metas[i], values=vals[i]) for i in alive]])
        assert np.array_equal(got, want), to_json(f)
        nonempty += bool(want.size)
        assert g.count_items(f) == want.size
    assert nonempty > 100  # the random filters are not all empty


@pytest.mark.parametrize("strategy", ["auto", "pre", "post"])
def test_filtered_search_equals_brute_force(world, strategy, monkeypatch):
    import galleria.store.filtered as filtered

    monkeypatch.setattr(filtered, "PREFILTER_MIN", 100)  # both strategies on 1,500 items
    g, x, metas, ids, alive = world
    fields = g.payload_fields()
    rng = np.random.default_rng({"auto": 1, "pre": 2, "post": 3}[strategy])
    seen = set()
    for _ in range(60):
        f = bind(_random_filter(rng), fields)
        q = l2_normalize(rng.standard_normal((3, x.shape[1])).astype(np.float32))
        k = int(rng.integers(1, 30))
        res, plan = search_filtered(g, q, k, space="sp", where=f, strategy=strategy)
        seen.add(plan.strategy)
        ws, wi = _brute(x, metas, alive, f, q, k)
        for r in range(len(q)):
            got = [i for i in res.ids[r] if i is not None]
            assert got == [ids[j] for j in wi[r]], (to_json(f), plan)
            np.testing.assert_allclose(res.scores[r, : len(got)], ws[r], rtol=1e-5, atol=1e-6)
    assert seen - {"empty"} == ({"pre", "post"} if strategy == "auto" else {strategy})


def test_view_level_filtered_topk_with_a_brute_force_vector_source(world):
    g, x, _metas, ids, _alive = world
    view = g.view("sp")
    keys = g.keys_of(ids)
    table = dict(zip(keys.tolist(), range(len(ids)), strict=True))
    rng = np.random.default_rng(5)
    for frac in (0.0005, 0.01, 0.3, 0.9):
        allowed = np.sort(rng.choice(keys[20:], max(1, int(frac * len(keys))), replace=False))

        def vectors_of(ks, _allowed=allowed):
            return ks, x[[table[int(k)] for k in ks]]

        q = l2_normalize(rng.standard_normal((4, x.shape[1])).astype(np.float32))
        res, plan = filtered_topk(view, q, 10, allowed, vectors_of)
        rows = [table[int(k)] for k in allowed]
        s = q @ x[rows].T
        order = np.argsort(-s, axis=1)[:, :10]
        want = allowed[order]
        for r in range(4):
            got = res.ids[r][res.ids[r] >= 0]
            assert got.tolist() == want[r].tolist(), plan


def test_where_through_the_gallery_api_and_errors(world):
    g, x, metas, ids, _alive = world
    q = x[100:101]
    res = g.search(q, 5, space="sp", where=["label=cat", "year>=2000"])
    for i in res.ids[0]:
        m = metas[ids.index(i)]
        assert m["label"] == "cat" and m["year"] >= 2000
    with pytest.raises(InputError, match="no item has a field 'colour'"):
        g.search(q, 5, space="sp", where="colour=red")
    with pytest.raises(InputError, match="does not combine"):
        g.search(q, 5, space="sp", where="label=cat", dim=8)


# ------------------------------------------------------------------ listing
def test_scroll_lists_every_matching_item_once_in_order(world):
    g, _x, metas, ids, alive = world
    f = as_filter(["year>=2005"])
    got, cursor, pages = [], None, 0
    while True:
        page = g.list_items(f, cursor=cursor, limit=97)
        got += [r.id for r in page.items]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    want = [ids[i] for i in alive if metas[i].get("year", 0) >= 2005]
    assert got == want and pages == -(-len(want) // 97)
    every = g.list_items(limit=5)
    assert [r.id for r in every.items] == [ids[i] for i in alive[:5]]
    assert "path" in every.items[0].meta and "path" not in every.to_dict()["items"][0]["metadata"]
    with pytest.raises(InputError, match="not a cursor"):
        g.list_items(cursor="garbage!")
    with pytest.raises(InputError, match="limit must be"):
        g.list_items(limit=0)
    assert g.count_items() == len(alive) and g.count_items(space="sp") == len(alive)


def test_payloads_follow_writes_and_old_galleries_get_an_index(tmp_path):
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.standard_normal((6, 8)).astype(np.float32))
    g = Gallery.create(tmp_path / "g")
    g.add(list("abcdef"), x, space="s", meta=[{"c": "red"}] * 3 + [{"c": "blue"}] * 3)
    assert g.count_items("c=red") == 3
    g.add(["a"], x[:1], space="s", meta=[{"c": "blue"}], replace=True)  # metadata changed
    assert g.count_items("c=red") == 2 and g.count_items("c=blue") == 4
    g.remove(["d"])
    assert g.count_items("c=blue") == 3
    # a gallery from before payloads: the table is dropped, then rebuilt on a writable open
    with g.db.write() as c:
        for t in ("items_payload_insert", "items_payload_update", "items_payload_delete"):
            c.execute(f"DROP TRIGGER {t}")
        c.execute("DROP TABLE payloads")
        c.execute("DROP TABLE payload_state")
    g.close()
    ro = Gallery.open(tmp_path / "g", readonly=True)  # read-only: the reference evaluator
    assert ro.count_items("c=blue") == 3 and ro.payload_fields() == {"c": {"string": 5}}
    ro.close()
    with Gallery.open(tmp_path / "g") as g2:
        assert g2.count_items("c=blue") == 3 and g2.payload_fields() == {"c": {"string": 5}}


def test_concurrent_writers_and_scrollers_stay_consistent(tmp_path):
    """A writer thread adds, re-labels and removes items while readers scroll and count:
    a scroll never returns an item twice or out of order, and at the end the payload
    index equals the reference evaluator over the stored metadata."""
    rng = np.random.default_rng(9)
    d = 8
    g = Gallery.create(tmp_path / "g")
    g.add([f"s{i}" for i in range(200)],
          l2_normalize(rng.standard_normal((200, d)).astype(np.float32)), space="s",
          meta=[{"c": ["red", "blue"][i % 2], "n": i} for i in range(200)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        r = np.random.default_rng(1)
        try:
            for step in range(30):
                new = [f"w{step}-{j}" for j in range(5)]
                g.add(new, l2_normalize(r.standard_normal((5, d)).astype(np.float32)),
                      space="s", meta=[{"c": "green", "n": 1000 + step}] * 5)
                g.add([f"s{step}"], l2_normalize(r.standard_normal((1, d)).astype(np.float32)),
                      space="s", meta=[{"c": "blue"}], replace=True)
                g.remove([f"s{199 - step}"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def scroller():
        try:
            while not stop.is_set():
                seen, cursor = [], None
                while True:
                    page = g.list_items("c=blue OR c=green", cursor=cursor, limit=13)
                    seen += [r.key for r in page.items]
                    if page.next_cursor is None:
                        break
                    cursor = page.next_cursor
                assert len(seen) == len(set(seen)) and seen == sorted(seen)
                assert g.count_items("n>=0") >= 170
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=scroller)
                                                    for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    metas = dict(zip(g.ids(), g.meta(g.ids()), strict=True))
    for text in ("c=blue", "c=green", "n>=100", "c!=red"):
        f = bind(as_filter(text), g.payload_fields())
        want = sorted(i for i, m in metas.items() if matches(f, m))
        page = g.list_items(f, limit=10_000)
        assert sorted(r.id for r in page.items) == want, text
    g.close()


def test_filter_json_round_trip_is_stable():
    f = parse_where(["label=cat,dog", "year=2000..2010", "taken>=2021-05-01", "ok!=true"])
    assert json.loads(json.dumps(to_json(f))) == to_json(parse_filter(to_json(f)))


# ------------------------------------------------------------ CLI and searcher
def test_manifest_payloads_where_items_and_min_score_from_the_cli(tmp_path, capsys):
    from PIL import Image

    import _tiny  # registers tiny-test
    from galleria.cli.main import main as cli
    from galleria.decision import open_searcher
    from galleria.extract.job import index_images

    rng = np.random.default_rng(0)
    rows = ["path,label,year,tags:list,taken"]
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{['cat', 'dog', 'bird'][i % 3]},{2000 + i},"
                    f"{'a|b' if i % 2 else 'c'},2021-0{1 + i % 9}-15")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    g = tmp_path / "g"
    index_images(tmp_path / "m.csv", g, extractor=_tiny.tiny(3))
    with Gallery.open(g) as gal:
        assert gal.meta(["4.png"])[0] | {"path": None} == {
            "path": None, "label": "dog", "year": 2004, "tags": ["c"], "taken": "2021-05-15"}
        assert gal.payload_fields()["taken"] == {"date": 12}
    capsys.readouterr()
    assert cli(["items", str(g), "--where", "label=cat", "--where", "year>=2003",
                "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in lines[:-1]] == ["3.png", "6.png", "9.png"]
    assert lines[-1] == {"next_cursor": None} and "path" not in lines[0]["metadata"]
    assert cli(["items", str(g), "--where", "tags=a", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "6"
    assert cli(["items", str(g), "--limit", "5"]) == 0
    out = capsys.readouterr().out
    cursor = out.split("--cursor ")[1].strip()
    assert cli(["items", str(g), "--limit", "5", "--cursor", cursor, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["id"] == "5.png"
    s = open_searcher(g)
    x = s.gallery.get_vectors(s.gallery.keys_of(["7.png"]))
    res = s.search(x, 12, where="label=dog OR taken>=2021-08-01")
    got = [i for i in res.ids[0] if i is not None]
    assert got[0] == "7.png" and sorted(got) == ["1.png", "10.png", "4.png", "7.png", "8.png"]
    cut = s.search(x, 12, min_score=0.999)
    assert [i for i in cut.ids[0] if i is not None] == ["7.png"]
    assert np.isneginf(cut.scores[0, 1:]).all()
    assert cli(["search", str(g), str(tmp_path / "7.png"), "--where", "label=dog",
                "--where", "year<2005", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[0])["results"]
    assert [h["id"] for h in hits] == ["4.png", "1.png"] or \
        sorted(h["id"] for h in hits) == ["1.png", "4.png"]
    assert cli(["search", str(g), str(tmp_path / "7.png"), "--where", "colour=red"]) == 2
    assert "no item has a field 'colour'" in capsys.readouterr().err
    assert cli(["info", str(g)]) == 0
    assert "filterable fields (--where): label (string)" in capsys.readouterr().out
