"""The weights page (scorer/view.py): its colours, which rows it shows, token texts, bad input, and the
page itself in headless Chromium (Debian's `chromium` and `chromium-driver`, which .ci/run installs).

The browser tests keep a screenshot in runs/test-artifacts/ (PEAR_TEST_ARTIFACTS moves it); the
README's picture of the page is that file, copied to docs/weights-page.png.
"""
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scorer import view
from scorer.shards import core_table, list_shards, read_meta, spans_of, write_atomic
from scorer.tokentext import token_bytes, token_texts
from scorer.weights import WeightParams, ragged_weights

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("PEAR_TEST_ARTIFACTS") or ROOT / "runs" / "test-artifacts")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


# ---- colours: a plain unit test of the contrast of every token background ------------------------

def test_contrast_matches_known_wcag_values():
    assert view.contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert view.contrast("#777777", "#777777") == pytest.approx(1.0)
    assert view.contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the usual just-failing grey


def test_every_token_background_keeps_aa_contrast():
    """WCAG AA (4.5:1) for the text on every colour a token can have, and for the grey context text,
    the tooltip, and the colours as the page's CSS writes them."""
    for colour in view.PALETTE:
        assert view.contrast(view.text_colour(colour), colour) >= view.WCAG_AA, colour
    assert view.contrast(view.CONTEXT_TEXT, view.PAGE_BACKGROUND) >= view.WCAG_AA
    assert view.contrast(view.TIP_TEXT, view.TIP_BACKGROUND) >= view.WCAG_AA
    css = dict(re.findall(r"\.w\d+\{background:(#[0-9a-f]{6});color:(#[0-9a-f]{6})\}", view.palette_css()))
    assert len(css) == len(view.PALETTE) and all(view.contrast(bg, fg) >= view.WCAG_AA for bg, fg in css.items())


def test_the_colour_scale_is_centred_at_zero():
    k = len(view.PALETTE)
    assert view.colour_class(0.0, 2.0) == k // 2 and view.PALETTE[k // 2] == "#f7f7f7"
    assert view.colour_class(-2.0, 2.0) == 0 and view.colour_class(-50, 2.0) == 0
    assert view.colour_class(2.0, 2.0) == k - 1 and view.colour_class(50, 2.0) == k - 1
    assert view.colour_class(-0.5, 2.0) < k // 2 < view.colour_class(0.5, 2.0)
    assert view.page_scale([np.array([-0.63, 0.2]), np.array([])]) == 0.7


# ---- token texts ---------------------------------------------------------------------------------

def test_a_token_inside_a_character_shows_its_bytes_until_the_character_completes(tokenizer):
    text = "sum: 7 \u2713 \u00e9 \U0001F600 <b>&amp;</b> done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts, partial = token_texts(tokenizer, ids)
    assert "".join(texts) == tokenizer.decode(ids) == text  # every character once, where it completes
    assert partial, "the tiny vocabulary splits these characters into byte tokens"
    runs, run = [], []  # the runs of split tokens, each with the token that completes its character
    for i in range(len(ids)):
        if i in partial:
            assert texts[i] == "" and bytes.fromhex(partial[i]) == token_bytes(tokenizer, ids[i])
            run.append(i)
        elif run:
            runs.append((run, i))
            run = []
    assert [texts[i] for _, i in runs] == ["\u2713", "\u00e9", "\U0001F600"]
    for run, i in runs:  # the bytes shown, and the completing token's, make the character
        assert b"".join(bytes.fromhex(partial[j]) for j in run) + token_bytes(tokenizer, ids[i]) == texts[i].encode()


def test_template_and_special_tokens_are_text(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True)
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    texts, partial = token_texts(tokenizer, ids)
    assert texts[0] == "<|user|>" and texts[-1] == "<|assistant|>" and not partial


# ---- which rows -----------------------------------------------------------------------------------

def make_page(scores, out: Path, *args) -> dict:
    """Write a page with `python -m scorer.view`'s main; returns its data."""
    assert view.main(["--scores", str(scores), "--html", str(out), *args]) == 0
    return page_data(out)


def page_data(path: Path) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', path.read_text(), re.S)
    return json.loads(m.group(1))


def shard_rows(scores) -> dict[str, dict]:
    """id -> the row's columns, every row of every shard, with its mean weight under the shards' constants."""
    out = {}
    params = WeightParams.from_dict(read_meta(list_shards(scores)[0]))
    for path in list_shards(scores):
        table = pq.read_table(path)
        spans = spans_of(table)
        for i, row in enumerate(table.to_pylist()):
            t, b = np.array(row["target_logprobs"]), np.array(row["behavior_logprobs"])
            w, lw = ragged_weights([t], [b], params)
            out[row["id"]] = {**row, "spans": spans[i], "mean": float(w[0].astype(np.float64).mean()), "lw": lw[0]}
    return out


def test_the_rows_are_the_extremes_a_seeded_draw_and_the_named(scores, tmp_path):
    rows = shard_rows(scores)
    by_mean = sorted(rows, key=lambda i: rows[i]["mean"])
    named = by_mean[len(by_mean) // 2]
    data = make_page(scores, tmp_path / "a.html", "--n", "3", "--ids", named)
    kinds = {r["id"]: r["kinds"] for r in data["rows"]}
    assert [i for i, k in kinds.items() if "lowest" in k] == by_mean[:3]
    assert [i for i, k in kinds.items() if "highest" in k] == by_mean[::-1][:3]
    drawn = [i for i, k in kinds.items() if "random" in k]
    assert len(drawn) == 3 and "named" in kinds[named]
    for r in data["rows"]:
        assert r["mean"] == pytest.approx(rows[r["id"]]["mean"], abs=1e-6)
        assert r["ids"] == rows[r["id"]]["input_ids"] and r["length"] == len(r["ids"])
    # the draw is the seed's: the same again, another with another seed
    again = make_page(scores, tmp_path / "b.html", "--n", "3")
    assert [r["id"] for r in again["rows"] if "random" in r["kinds"]] == drawn
    other = make_page(scores, tmp_path / "c.html", "--n", "3", "--seed", "1")
    assert [r["id"] for r in other["rows"] if "random" in r["kinds"]] != drawn


def test_where_narrows_the_rows_chosen_but_not_the_named(scores, tmp_path):
    rows = shard_rows(scores)
    cut = int(np.median([len(r["input_ids"]) for r in rows.values()]))
    outside = next(i for i, r in rows.items() if len(r["input_ids"]) >= cut)
    data = make_page(scores, tmp_path / "a.html", "--n", "4", "--ids", outside,
                     "--where", f"length < {cut} AND response_tokens > 10 AND task = 'chain_sum'")
    assert data["kept_rows"] == sum(1 for r in rows.values() if len(r["input_ids"]) < cut
                                    and len(r["target_logprobs"]) > 10 and r["task"] == "chain_sum") > 4
    for r in data["rows"]:
        if r["id"] != outside:
            assert r["length"] < cut and r["tokens"] > 10 and ["task", "chain_sum"] in r["pass"]
    assert any(r["id"] == outside and r["kinds"] == ["named"] for r in data["rows"])


def test_weights_are_recomputed_for_other_constants_and_a_second_variant(scores, world, tmp_path):
    rows = shard_rows(scores)
    data = make_page(scores, tmp_path / "a.html", "--n", "2", "--variant", "sequence", "--compare", "token",
                     "--tokenizer", str(world / "tokenizer"))  # another folder with the same tokenizer
    assert data["params"]["variant"] == "sequence" and data["compare"] == "token"
    stored = WeightParams.from_dict(read_meta(list_shards(scores)[0]))
    for r in data["rows"]:
        row = rows[r["id"]]
        t, b = np.array(row["target_logprobs"]), np.array(row["behavior_logprobs"])
        seq = ragged_weights([t], [b], dataclasses.replace(stored, variant="sequence"))[1][0]
        assert len(set(r["lw"])) == 1 and r["lw"] == pytest.approx(seq.tolist(), abs=1e-4)
        # the second variant under the same constants: here the shards' own, so their stored weights
        assert np.exp(r["lw2"]) == pytest.approx(np.array(row["weights"]), rel=2e-4)


# ---- bad input: one line, exit 2 -------------------------------------------------------------------

def exit_code(argv: list[str]) -> int:
    """`python -m scorer.view`'s exit code (a flag whose value does not convert exits in the parser)."""
    try:
        return view.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args, message", [
    (["--ids", "no-such-row"], r"--ids: 'no-such-row' not in 2 shards"),
    (["--where", "mean_weight <<< 1"], r"--where 'mean_weight <<< 1' does not parse"),
    (["--where", "__import__('os').system('echo hi')"], r"--where .* does not parse"),
    (["--where", "nosuch > 1"], r"names nosuch: the columns are id, mean_weight, ess, length, response_tokens"),
    (["--where", "mean_weight + 1"], r"--where must be true or false of a row"),
    (["--compare", "nosuch"], r"--compare must be one of"),
])
def test_bad_input_is_one_line_and_exit_2(scores, tmp_path, capsys, args, message):
    assert exit_code(["--scores", str(scores), "--html", str(tmp_path / "p.html"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "p.html").exists()


def test_no_shards_or_another_tokenizer_is_one_line_and_exit_2(scores, tmp_path, capsys):
    from tests.tiny_tokenizers import tiny_tokenizer

    (tmp_path / "empty").mkdir()
    for folder, args, message in [
        (tmp_path / "empty", [], "no shards in"),
        (tmp_path / "missing", [], "scores folder not found"),
    ]:
        assert exit_code(["--scores", str(folder), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    other = tmp_path / "tok"
    tiny_tokenizer("qwen2_5").save_pretrained(other)
    assert exit_code(["--scores", str(scores), "--html", str(tmp_path / "p.html"), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the tokenizer the shards were made with" in err, err


# ---- the page in a real browser --------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through selenium and the system chromedriver (no browser download)."""
    if not (CHROMIUM and CHROMEDRIVER):
        message = "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by open_page
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1280,1000",
                "--hide-scrollbars", *(["--no-sandbox"] if os.geteuid() == 0 else [])):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> None:
    """Load the page from disk; the browser's console holds no error after it."""
    driver.get(path.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def screenshot(driver, png: Path) -> Path:
    """The window as a small PNG (a palette of 128 colours): the test's artifact, and the README's picture."""
    import io

    from PIL import Image

    png.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    return png


def rgb(colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


TOKENS_OF = """
const box = document.querySelector(`#row-${arguments[0]} .tokens[data-v="${arguments[1]}"]`);
return [...box.querySelectorAll('.tok')].map(s => {
  const st = getComputedStyle(s);
  return [+s.dataset.t, s.className, st.backgroundColor, st.color, s.textContent];
});"""
TIP = "return Object.fromEntries([...document.querySelectorAll('#tip dd')].map(d => [d.dataset.k, d.textContent]))"


def hover(driver, element) -> dict:
    from selenium.webdriver.common.action_chains import ActionChains

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    ActionChains(driver).move_to_element(element).perform()
    assert driver.execute_script("return !document.getElementById('tip').hidden")
    return driver.execute_script(TIP)


def check_tooltip(tip: dict, row: dict, t: int, j: int, lw: float) -> None:
    """The tooltip of the token at position t (scored token j, -1 for context) against the shards."""
    assert tip["id"] == str(row["input_ids"][t])
    if j < 0:
        assert "t" not in tip and "w" not in tip
        return
    target, behavior = row["target_logprobs"][j], row["behavior_logprobs"][j]
    assert float(tip["t"]) == pytest.approx(target, abs=6e-5)
    assert float(tip["b"]) == pytest.approx(behavior, abs=6e-5)
    assert float(tip["d"]) == pytest.approx(min(max(target - behavior, -0.08), 0.3), abs=1.2e-4)
    assert float(tip["lw"]) == pytest.approx(lw, abs=6e-5)
    assert float(tip["w"]) == pytest.approx(row["weights"][j], rel=1e-3)  # 4 significant digits


@pytest.mark.slow(seconds=15)
def test_the_page_shows_the_shards_tokens_colours_and_numbers(scores, tokenizer, browser, tmp_path):
    rows = shard_rows(scores)
    path = tmp_path / "weights.html"
    data = make_page(scores, path, "--n", "4")
    assert "http://" not in path.read_text().replace('"http://www.w3.org/2000/svg"', "")  # nothing to fetch
    open_page(browser, path)
    scale = float(data["scale"])
    assert browser.execute_script("return document.querySelectorAll('article.row').length") == len(data["rows"])
    for i, r in enumerate(data["rows"][:6]):
        row = rows[r["id"]]
        scored = {t: j for j, t in enumerate(t for a, b in row["spans"] for t in range(a, b))}
        tokens = browser.execute_script(TOKENS_OF, i, 0)
        assert [t for t, *_ in tokens] == list(range(len(row["input_ids"])))
        text = "".join(s for t, cls, _, _, s in tokens if "bytes" not in cls)
        assert text == tokenizer.decode(row["input_ids"], skip_special_tokens=False)
        for t, cls, background, colour, _ in tokens:
            if t not in scored:
                assert "ctx" in cls and colour == rgb(view.CONTEXT_TEXT) and background == "rgba(0, 0, 0, 0)"
                continue
            lw = math.log(row["weights"][scored[t]])
            near = {view.colour_class(lw + e, scale) for e in (-1e-4, 0, 1e-4)}  # the page rounds to 4 decimals
            k = int(re.search(r"\bw(\d+)\b", cls).group(1))
            assert k in near and background == rgb(view.PALETTE[k]), (t, cls, background, near)
            assert colour == rgb(view.text_colour(view.PALETTE[k]))
        # the tooltip of a context token, the first and last scored tokens and one between, on hover
        spans = browser.find_elements("css selector", f"#row-{i} .tokens .tok")
        first, last = min(scored), max(scored)
        for t in (0, first, (first + last) // 2, last):
            j = scored.get(t, -1)
            check_tooltip(hover(browser, spans[t]), row, t, j, float(row["lw"][j]) if j >= 0 else 0.0)
    # on focus: arrow keys move along the tokens and the tooltip follows
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    row = rows[data["rows"][0]["id"]]
    spans = browser.find_elements("css selector", "#row-0 .tokens .tok")
    first = row["spans"][0][0]
    spans[first].click()
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    assert browser.execute_script("return document.activeElement.dataset.t") == str(first + 1)
    check_tooltip(browser.execute_script(TIP), row, first + 1, 1, float(row["lw"][1]))


@pytest.mark.slow(seconds=10)
def test_the_list_sorts_and_filters(scores, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    rows = shard_rows(scores)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "score").symlink_to(scores)  # the page names its folder as the README's commands do
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "weights.html"
    data = make_page("runs/score", path, "--n", "4")
    open_page(browser, path)
    listed = lambda: browser.execute_script(  # the ids in the list, top to bottom, that the filter shows
        "return [...document.querySelectorAll('#list tbody tr')].filter(r => !r.hidden)"
        ".map(r => r.children[1].textContent)")
    shown = lambda: browser.execute_script(  # and the rows below it
        "return [...document.querySelectorAll('article.row')].filter(a => !a.hidden)"
        ".map(a => a.querySelector('.rid').textContent)")
    ids = [r["id"] for r in data["rows"]]
    assert listed() == ids == shown()
    header = browser.find_element(By.XPATH, "//table[@id='list']//th/button[starts-with(text(), 'mean weight')]")
    header.click()
    ascending = sorted(ids, key=lambda i: rows[i]["mean"])
    assert listed() == ascending == shown()
    header.click()
    assert listed() == ascending[::-1] == shown()
    browser.find_element(By.XPATH, "//table[@id='list']//th/button[text()='length']").click()
    lengths = [len(rows[i]["input_ids"]) for i in listed()]
    assert lengths == sorted(lengths)
    # the filter: an id keeps its row, in the list and below it; a kind keeps its rows
    box = browser.find_element(By.ID, "filter")

    def type_in(text: str) -> None:  # as a user types (select all, delete, type): each key an input event
        box.send_keys(Keys.CONTROL + "a" + Keys.NULL, Keys.BACKSPACE, *([text] if text else []))

    type_in(ids[-1])
    assert listed() == [ids[-1]] == shown()
    assert browser.find_element(By.ID, "count").text == f"1 of {len(ids)} rows"
    type_in("lowest")
    assert sorted(listed()) == sorted(r["id"] for r in data["rows"] if "lowest" in r["kinds"])
    type_in("")
    assert len(listed()) == len(ids)

    # the screenshot (the README's picture): the top of the page and the first rows, a tooltip open
    browser.find_element(By.XPATH, "//table[@id='list']//th/button[text()='#']").click()
    browser.set_window_size(1280, 1500)
    try:
        token = browser.find_elements("css selector", "#row-0 .tokens .sc")[3]
        hover(browser, token)
        browser.execute_script("window.scrollTo(0, 0)")
        ActionChains(browser).move_to_element(token).perform()
        shot = screenshot(browser, ARTIFACTS / "weights-page.png")
    finally:
        browser.set_window_size(1280, 1000)
    assert shot.stat().st_size < 1_000_000


@pytest.mark.slow(seconds=10)
def test_the_page_escapes_text_and_shows_split_characters_as_bytes(scores, tokenizer, browser, tmp_path):
    """A conversation of two assistant turns whose tokens and corpus column hold markup: it shows as
    text and runs nothing; both turns are scored, the user turn between them is context."""
    folder = tmp_path / "scores"
    folder.mkdir()
    meta = read_meta(list_shards(scores)[0])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    turns = ["</script><script>window.pwned=1</script>", "<img src=x onerror=\"window.pwned=2\"> \u2713",
             "and <b>then</b>?", "&lt;b&gt; \U0001F600</body>"]
    parts, spans = [], []  # (text, scored)
    for role, content in zip(["user", "assistant"] * 2, turns):
        head = tokenizer.apply_chat_template([{"role": role, "content": content}], tokenize=False)
        if role == "user":
            parts.append((head + "<|assistant|>", False))
        else:  # the assistant's text and its end token are scored, its role tag (in the user part) is not
            parts.append((head[len("<|assistant|>"):], True))
    ids, text = [], ""
    for part, scored in parts:
        start = len(ids)
        ids += encode(part)
        text += part
        if scored:
            spans.append((start, len(ids)))
    n = sum(b - a for a, b in spans)
    rng = np.random.default_rng(0)
    t, b = rng.uniform(-3, 0, n).astype(np.float32), rng.uniform(-3, 0, n).astype(np.float32)
    w = ragged_weights([t], [b], WeightParams.from_dict(meta))[0][0]
    table = core_table(["<b>id</b>"], [ids], [spans], [t], [b], [w])
    table = table.append_column("note", pa.array(["</script><i>not italic</i>"]))
    write_atomic(table, folder / "x.parquet", {**meta, "passthrough_columns": ["note"]})
    path = tmp_path / "weights.html"
    data = make_page(folder, path, "--n", "1")
    assert "<i>not" not in path.read_text() and "<img src=x" not in path.read_text()
    open_page(browser, path)
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('#details img, #details i, #details script, "
                                  "#list b').length") == 0
    assert browser.execute_script("return document.querySelector('#row-0 .rid').textContent") == "<b>id</b>"
    note = browser.execute_script("return document.querySelector('dl.pass').textContent")
    assert "</script><i>not italic</i>" in note
    tokens = browser.execute_script(TOKENS_OF, 0, 0)
    shown = "".join(s for _, cls, _, _, s in tokens if "bytes" not in cls)
    assert shown == text == tokenizer.decode(ids, skip_special_tokens=False)
    split = [(t, s) for t, cls, _, _, s in tokens if "bytes" in cls]
    assert split and all(s == "".join(f"\\x{h}" for h in data["rows"][0]["bytes"][str(t)].split()) for t, s in split)
    assert shown.count("\U0001F600") == 1 and shown.count("\u2713") == 1
    # both assistant turns scored, in order; the user turn between them is context
    scored = [t for t, cls, *_ in tokens if "sc" in cls.split()]
    assert scored == [t for a, b in spans for t in range(a, b)]
    assert all("ctx" in cls for t, cls, *_ in tokens if spans[0][1] <= t < spans[1][0])
    tip = hover(browser, browser.find_elements("css selector", "#row-0 .tokens .tok")[spans[1][0]])
    assert tip["id"] == str(ids[spans[1][0]])
    assert float(tip["t"]) == pytest.approx(float(t[spans[0][1] - spans[0][0]]), abs=6e-5)
    assert "2 assistant spans" in browser.execute_script("return document.querySelector('#row-0 .stats').textContent")


@pytest.mark.slow(seconds=5)
def test_two_variants_side_by_side(scores, browser, tmp_path):
    rows = shard_rows(scores)
    path = tmp_path / "weights.html"
    data = make_page(scores, path, "--n", "1", "--variant", "sequence", "--compare", "token")
    open_page(browser, path)
    row = rows[data["rows"][0]["id"]]
    assert browser.execute_script("return document.querySelectorAll('#row-0 .pane').length") == 2
    first = row["spans"][0][0]
    left = browser.find_elements("css selector", "#row-0 .tokens[data-v='0'] .tok")[first]
    right = browser.find_elements("css selector", "#row-0 .tokens[data-v='1'] .tok")[first]
    check_tooltip(hover(browser, right), row, first, 0, float(row["lw"][0]))  # token: the shards' own weights
    tip = hover(browser, left)
    assert float(tip["lw"]) == pytest.approx(data["rows"][0]["lw"][0], abs=1e-4)
    assert len({browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor", s)
                for s in browser.find_elements("css selector", "#row-0 .tokens[data-v='0'] .sc")}) == 1


@pytest.mark.slow(seconds=30)  # three fresh processes, each importing torch and transformers
def test_the_benchmark_runs_at_its_smallest(scores, tmp_path, monkeypatch):
    from bench import bench_view

    monkeypatch.setenv("OUT", str(tmp_path / "results"))
    assert bench_view.main(["--sizes", "100,200", "--scores", str(scores), "--page-rows", "2",
                            "--out", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "results" / "bench_view.json").read_text())
    assert [r["rows"] for r in report["results"]] == [100, 200] and report["page"]["rows"] >= 2
    assert all(r["choose_seconds"] > 0 and r["peak_rss_mib"] > 0 for r in report["results"])
