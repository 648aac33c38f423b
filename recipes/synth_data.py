"""Synthetic draft -> final pairs of Japanese monthly fund-report comments.

The real comments of an asset manager are confidential, so the demo set, the tests and the speed
benchmarks run on text made here. ``generate_pairs(n, seed)`` draws market facts for each
(fund, month), writes the **final** from house-style templates (the rules are in
datasets/house_style.md; every rule there is implemented in this file and nowhere else), and
derives the **draft** from the same sentences with the transforms that imitate the formats
external managers actually send: である調, アメリカ/米, Fed, "S&P 500", full-width digits and ％,
"パーセント", ▲ for minus, 前月比 phrasing, BM/OW abbreviations, redundant phrases, greetings,
their own section headings, bullets and line breaks, and now and then half-width katakana.
Because the draft is derived from the final's facts, the numbers always agree: the rewrite is a
change of style, never of content.

Usage:
    python -m recipes.synth_data --n 100 --seed 0 --output datasets/demo_pairs.jsonl
The output format follows the suffix (.jsonl, .csv or .xlsx). Everything is deterministic for
(n, seed): one ``random.Random(seed)`` drives all choices.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import tempfile
import unicodedata
from pathlib import Path

SECTIONS = ("市場動向", "運用状況", "今後の見通しと運用方針")
COLUMNS = ("date", "section", "fund", "manager", "draft", "final")
FIRST_MONTH = (2023, 1)
MIN_MONTHS = 18  # enough months for a train/validation/test split by time

# ---------------------------------------------------------------------------------------------
# Funds: kind decides the templates; manager decides how the draft deviates from house style.
FUNDS = {
    "日本株式ファンド": dict(kind="equity", alloc="業種配分", start=(2300, 2600), manager="さくらアセットマネジメント",
                     market="国内株式市場", index="TOPIX",
                     up=["円安の進行", "好調な企業決算", "海外投資家の買い越し", "株主還元強化への期待"],
                     down=["円高の進行", "米国の長期金利上昇", "半導体関連株の調整", "日銀の金融政策修正への警戒"],
                     sectors=["電気機器", "銀行業", "輸送用機器", "情報・通信業", "医薬品", "機械"]),
    "米国株式ファンド": dict(kind="equity", alloc="業種配分", start=(3900, 4300), manager="Hudson Global Advisors",
                     market="米国株式市場", index="S&P500",
                     up=["FRBによる利下げ観測", "堅調な企業決算", "生成AI関連銘柄の上昇", "インフレの鈍化"],
                     down=["米国の長期金利上昇", "FRBの金融引き締め長期化への警戒", "大型ハイテク株の調整", "景気減速懸念"],
                     sectors=["情報技術", "ヘルスケア", "金融", "一般消費財", "資本財"]),
    "新興国株式ファンド": dict(kind="equity", alloc="国別配分", start=(950, 1050), manager="Hudson Global Advisors",
                      market="新興国株式市場", index="MSCI新興国株価指数",
                      up=["中国の景気対策への期待", "インド株式の堅調な推移", "米ドル安の進行", "半導体需要の回復"],
                      down=["中国の不動産市場をめぐる懸念", "米ドル高の進行", "地政学リスクの高まり", "米国の長期金利上昇"],
                      sectors=["台湾", "インド", "韓国", "ブラジル", "中国"]),
    "国内リートファンド": dict(kind="equity", alloc="セクター配分", start=(1800, 2000), manager="さくらアセットマネジメント",
                      market="国内リート市場", index="東証REIT指数",
                      up=["オフィス空室率の改善", "国内長期金利の低下", "ホテル需要の回復"],
                      down=["国内長期金利の上昇", "日銀の金融政策修正への警戒", "公募増資による需給悪化"],
                      sectors=["オフィス", "物流施設", "ホテル", "住宅"]),
    "先進国債券ファンド": dict(kind="bond", alloc="国別配分", manager="Rhein Capital Partners",
                      market="先進国債券市場",
                      up=["インフレの鈍化", "FRBによる利下げ観測", "景気減速懸念"],  # yields fall
                      down=["堅調な米国の雇用統計", "インフレの高止まり", "ECBの金融引き締め長期化観測"],
                      sectors=["米国", "ユーロ圏", "英国", "オーストラリア"]),
    "バランス型ファンド": dict(kind="balanced", alloc="資産配分", manager="みなと投信顧問", market="国内外の金融市場",
                      up=["国内外の株式市場の上昇", "円安の進行"],
                      down=["国内外の株式市場の下落", "円高の進行"],
                      sectors=["国内株式", "外国株式", "国内債券", "外国債券"]),
}

OUTLOOK = {
    "equity": ["{market}は、企業業績の改善が下支えとなり、底堅く推移すると予想します。",
               "{market}は、金融政策をめぐる不透明感から、当面は値動きの大きい展開が続くと予想します。",
               "{market}は、景気の先行きに慎重な見方があるものの、中長期的には上昇基調が続くと考えています。"],
    "bond": ["インフレの鈍化が続けば、主要中央銀行の利下げにより金利は緩やかに低下すると予想します。",
             "金融政策の先行きに不透明感が残り、金利は当面一進一退の動きになると予想します。"],
    "balanced": ["国内外の金融市場は、各国の金融政策や景気動向を見極めながら推移すると予想します。",
                 "株式市場は底堅い一方、金利の動向には引き続き注意が必要と考えています。"],
}
POLICY = {
    "equity": ["引き続き、収益性の改善が見込まれる銘柄を中心に投資する方針です。",
               "引き続き、{sector}を中心に、割安と判断される銘柄に投資する方針です。",
               "個別企業の調査を重ね、銘柄選択によって超過収益の獲得を目指します。"],
    "bond": ["デュレーションはベンチマーク並みを基本とし、国別配分では{sector}を重視する方針です。",
             "金利動向を注視しながら、デュレーションを機動的に調整する方針です。"],
    "balanced": ["基本資産配分を維持しつつ、市場動向に応じて機動的に配分を調整する方針です。",
                 "引き続き、リスクを抑えながら安定的な収益の確保を目指します。"],
}

# ---------------------------------------------------------------------------------------------
# Facts and house-style (final) sentences. Numbers: half-width, one decimal (yields two), signed
# changes as 前月末比+2.1% / -1.3%, differences of returns in %ポイント.


def _pct(rng: random.Random, lo: float, hi: float, nd: int = 1) -> float:
    while True:  # a zero change reads oddly ("+0.0%") and has no direction: draw again
        x = round(rng.uniform(lo, hi), nd)
        if x != 0:
            return x


def _level_walk(rng: random.Random, level: float, change: float, lo: float, hi: float) -> tuple[float, float]:
    """(level after ``change``, change): a yield moves by ``change`` %pt, turned around at the
    edges of [lo, hi] so it stays plausible."""
    if not lo <= level + change <= hi:
        change = -change
    return round(level + change, 2), change


def draw_series(rng: random.Random, months: int) -> dict[str, list[dict]]:
    """Facts of every fund for every month. Index levels and yields walk from month to month, so
    a level and its 前月末比 agree across months; the balanced fund quotes the same TOPIX and
    S&P500 moves as the equity funds."""
    series: dict[str, list[dict]] = {}
    for fund, spec in FUNDS.items():
        kind, rows = spec["kind"], []
        level = rng.uniform(*spec.get("start", (1000, 1000)))
        us, de = rng.uniform(3.6, 4.6), rng.uniform(2.0, 2.8)
        for m in range(months):
            f = {"market": spec["market"], "index": spec.get("index", ""), "alloc": spec.get("alloc", "")}
            if kind == "bond":
                f["us_level"], f["us"] = _level_walk(rng, us, _pct(rng, -0.35, 0.35, 2), 3.0, 5.2)
                f["de_level"], f["de"] = _level_walk(rng, de, _pct(rng, -0.3, 0.3, 2), 1.8, 3.0)
                us, de = f["us_level"], f["de_level"]
                f["bench"] = _pct(rng, 0.3, 2.0) * (-1 if f["us"] > 0 else 1)
                f["driver"] = rng.choice(spec["down"] if f["us"] > 0 else spec["up"])
            elif kind == "balanced":
                f["topix"], f["sp"] = series["日本株式ファンド"][m]["bench"], series["米国株式ファンド"][m]["bench"]
                f["weak_yen"] = rng.random() < 0.5
                f["bench"] = round((f["topix"] + f["sp"]) / 4 + _pct(rng, -0.5, 0.5), 1)
            else:
                f["bench"] = _pct(rng, -5.0, 6.0)
                level = level * (1 + f["bench"] / 100)
                f["level"] = round(level, 2)
                f["driver"] = rng.choice(spec["up"] if f["bench"] > 0 else spec["down"])
            f["active"] = _pct(rng, -0.8, 0.8)
            while round(f["bench"] + f["active"], 1) == 0 or f["bench"] == 0:  # no "+0.0%"
                f["active"], f["bench"] = _pct(rng, -0.8, 0.8), f["bench"] or 0.1
            f["fund_ret"] = round(f["bench"] + f["active"], 1)
            f["sector"], f["sector2"] = rng.sample(spec["sectors"], 2)
            f["outlook"] = rng.choice(OUTLOOK[kind]).format(**f)
            f["policy"] = rng.choice(POLICY[kind]).format(**f)
            rows.append(f)
        series[fund] = rows
    return series


def s(x: float, nd: int = 1) -> str:
    """House format of a signed change: +2.1 / -1.3 (half-width sign, fixed decimals)."""
    return f"{x:+.{nd}f}"


def final_sentences(kind: str, section: str, f: dict) -> list[str]:
    """The house-style comment as a list of sentences (each ends with 。)."""
    up = f["bench"] > 0
    if section == "市場動向":
        if kind == "bond":
            move = "上昇" if f["us"] > 0 else "低下"
            return [f"当月は{f['driver']}を背景に金利が{move}しました。",
                    f"米国10年国債利回りは{f['us_level']:.2f}%（前月末比{s(f['us'], 2)}%ポイント）、"
                    f"ドイツは{f['de_level']:.2f}%（同{s(f['de'], 2)}%ポイント）となりました。"]
        if kind == "balanced":
            return [f"当月の国内外の株式市場では、TOPIXが前月末比{s(f['topix'])}%、"
                    f"S&P500が前月末比{s(f['sp'])}%となりました。",
                    f"為替市場では{'円安' if f['weak_yen'] else '円高'}が進みました。"]
        return [f"当月の{f['market']}は{'上昇' if up else '下落'}し、"
                f"{f['index']}は{f['level']:,.2f}ポイント（前月末比{s(f['bench'])}%）となりました。",
                f"{f['driver']}が{'支えとなりました' if up else '重荷となりました'}。"]
    if section == "運用状況":
        over = f["active"] > 0
        first = f"当月の基準価額（分配金再投資ベース）は前月末比{s(f['fund_ret'])}%となりました。"
        if kind == "balanced":
            return [first, f"資産別では{f['sector']}が{'プラス' if f['fund_ret'] > 0 else 'マイナス'}に寄与しました。"]
        first = (first[:-len("ました。")] + f"、ベンチマーク（{s(f['bench'])}%）を{abs(f['active']):.1f}%ポイント"
                 + ("上回りました。" if over else "下回りました。"))
        if over:
            return [first, f"{f['sector']}のオーバーウェイトなど{f['alloc']}がプラスに寄与しました。"]
        return [first, f"{f['sector2']}のアンダーウェイトなど{f['alloc']}がマイナスに影響しました。"]
    return [f["outlook"], f["policy"]]


# Machine check of datasets/house_style.md (rule numbers as there); every final passes it, and
# benchmarks can use it to count style slips in model output.
STYLE_CHECKS = [
    ("1 です・ます調", lambda t: [x for x in re.split(r"(?<=。)", t) if x.strip()
                             and not re.search(r"(です|ます|ました|でした)。$", x.strip())]),
    ("2 米国/FRB/S&P500", lambda t: re.findall(r"アメリカ|米(?![国ドル])|Fed|FED|S&P 500|S＆P", t)),
    ("3 半角数字と%", lambda t: re.findall(r"[０-９％＋－．，]|パーセント", t)),
    ("4 前月末比+x.x%", lambda t: re.findall(r"前月比|対前月|前月末から|[▲△]|マイナス\d|前月末比(?![+-]\d)|同\d", t)),
    ("5 3桁区切り", lambda t: re.findall(r"(?<![\d.,])\d{4,}(?!年)", t)),
    ("6 略語なし", lambda t: re.findall(r"(?<![A-Za-z])(?:BM|OW|UW)(?![A-Za-z])", t)),
    ("7 一段落・見出しなし", lambda t: re.findall(r"\n|^[・●■【＜<\-]|^\d\. ", t)),
    ("8 定型あいさつなし", lambda t: re.findall(r"申し上げます|お世話になっております", t)),
    ("9 冗長表現なし", lambda t: re.findall(r"結果となりました|展開となりました|としております|しております|次第です", t)),
    ("10 半角カナなし", lambda t: re.findall(r"[\uff61-\uff9f]", t)),
]


def house_style_violations(text: str) -> list[str]:
    """'rule: offending text' for each house-style rule ``text`` breaks (empty list: conforms)."""
    return [f"{rule}: {hit!r}" for rule, check in STYLE_CHECKS for hit in check(text)]


# ---------------------------------------------------------------------------------------------
# Draft transforms: each takes a sentence (or the sentence list) and rng; a manager profile says
# how likely each one is. They only restyle; no transform adds, drops or changes a number.

PLAIN = [("でした", "であった"), ("です", "である"), ("ています", "ている"), ("しました", "した"),
         ("りました", "った"), ("みました", "んだ"), ("れました", "れた"), ("します", "する"),
         ("れます", "れる"), ("えます", "える"), ("います", "いる")]


def to_dearu(t: str) -> str:
    """です・ます調 -> である調 at sentence ends and before 、 (the forms the templates use)."""
    for pol, plain in PLAIN:
        t = re.sub(pol + r"(?=[。、]|$)", plain, t)
    return t.replace("目指する", "目指す")


def us_name(t: str, rng: random.Random) -> str:
    return t.replace("米国", rng.choice(["アメリカ", "米"]))


def english_terms(t: str, rng: random.Random) -> str:
    t = t.replace("FRB", rng.choice(["Fed", "FED", "米連邦準備制度理事会"]))
    t = t.replace("S&P500", rng.choice(["S&P 500", "S&P500種株価指数", "S＆P500"]))
    t = t.replace("ベンチマーク", "BM").replace("オーバーウェイト", "OW").replace("アンダーウェイト", "UW")
    return t.replace("ECB", "欧州中央銀行（ECB）")


def change_phrase(t: str, rng: random.Random) -> str:
    """前月末比+2.1% -> 前月比2.1%の上昇 / 前月末から2.1%上昇 (direction as a word)."""
    def repl(m: re.Match) -> str:
        same, sign, num, pt = m.group(1) == "同", m.group(2), m.group(3), m.group(4) or ""
        word = ("上昇" if sign == "+" else ("低下" if pt else "下落"))
        if same:  # 同+0.23%ポイント: the second change in a sentence
            return rng.choice([f"同{num}%{pt}の{word}", f"同{num}%{pt}{word}"])
        return rng.choice([f"前月比{num}%{pt}の{word}", f"前月末から{num}%{pt}{word}", f"対前月で{num}%{pt}{word}"])
    return re.sub(r"(前月末比|同)([+-])(\d+\.\d+)%(ポイント)?", repl, t)


def minus_sign(t: str, rng: random.Random) -> str:
    return re.sub(r"-(?=\d)", rng.choice(["▲", "△", "マイナス"]), t)


def no_comma(t: str, rng: random.Random) -> str:
    return re.sub(r"(?<=\d),(?=\d{3})", "", t)


def percent_word(t: str, rng: random.Random) -> str:
    return t.replace("%ポイント", "ポイント").replace("%", "パーセント")


def full_width(t: str, rng: random.Random) -> str:
    table = {c: chr(ord(c) + 0xFEE0) for c in "0123456789.,%+"}
    table["-"] = "－"
    return re.sub(r"[0-9.,%+\-]+", lambda m: "".join(table[c] for c in m.group()), t)


def redundant(t: str, rng: random.Random) -> str:
    t = re.sub(r"(上昇|下落|低下)しました。", lambda m: rng.choice([f"{m.group(1)}する結果となりました。",
                                                                   f"{m.group(1)}する展開となりました。"]), t)
    t = t.replace("方針です。", "方針としております。").replace("予想します。", "予想しております。")
    return t.replace("考えています。", "考えている次第です。")


def half_width_kana(t: str, rng: random.Random) -> str:
    words = ["ベンチマーク", "ポイント", "オーバーウェイト", "アンダーウェイト", "デュレーション"]
    for w in words:
        hw = "".join(_HALF.get(c, c) for c in unicodedata.normalize("NFD", w))
        t = t.replace(w, hw)
    return t


# full-width katakana (decomposed) -> half-width: built from NFKC so the map is exact
_HALF = {unicodedata.normalize("NFKC", chr(c)): chr(c) for c in range(0xFF66, 0xFF9E)}
_HALF.update({"\u3099": "\uff9e", "\u309a": "\uff9f"})

HEADINGS = {
    "市場動向": ["【市場概況】", "■マーケットレビュー", "＜市場環境＞", "Market Review", "1. 市場動向"],
    "運用状況": ["【運用経過】", "■ファンドの運用状況", "＜ポートフォリオの状況＞", "Performance Review", "2. 運用状況"],
    "今後の見通しと運用方針": ["【今後の見通し】", "■今後の運用方針", "＜Outlook＞", "Outlook & Strategy", "3. 今後の方針"],
}
OPENINGS = ["平素は格別のご高配を賜り、厚く御礼申し上げます。", "いつもお世話になっております。"]
CLOSINGS = ["以上、ご報告申し上げます。", "引き続きご愛顧賜りますようお願い申し上げます。"]

# manager -> probability of each transform (draft deviations are a habit of the sender)
PROFILES = {
    "さくらアセットマネジメント": dict(dearu=0.9, full_width=0.8, heading=0.7, half_kana=0.3,
                                change=0.3, redundant=0.0, bullets=0.1, newlines=0.3),
    "Hudson Global Advisors": dict(us_name=0.8, english=0.9, no_comma=0.7, bullets=0.6, percent_word=0.2,
                                   minus=0.3, heading=0.5, newlines=0.2),
    "Rhein Capital Partners": dict(us_name=0.7, percent_word=0.7, change=0.8, newlines=0.7,
                                   heading=0.4, dearu=0.3, english=0.3),
    "みなと投信顧問": dict(redundant=0.9, greeting=0.6, no_comma=0.3, minus=0.6, change=0.4, full_width=0.3,
                       heading=0.5, newlines=0.4),
}
TEXT_TRANSFORMS = [("redundant", redundant), ("dearu", lambda t, r: to_dearu(t)), ("us_name", us_name),
                   ("english", english_terms), ("change", change_phrase), ("minus", minus_sign), ("no_comma", no_comma),
                   ("percent_word", percent_word), ("full_width", full_width), ("half_kana", half_width_kana)]


def make_draft(final: list[str], section: str, manager: str, rng: random.Random) -> str:
    prof = PROFILES[manager]
    on = {k: rng.random() < p for k, p in prof.items()}
    sents = list(final)
    if on.get("greeting"):  # boilerplate that the house style drops
        if rng.random() < 0.3:
            sents.insert(0, rng.choice(OPENINGS))
        else:
            sents.append(rng.choice(CLOSINGS))
    text_on = [fn for name, fn in TEXT_TRANSFORMS if on.get(name)]
    out = []
    for sent in sents:
        for fn in text_on:
            sent = fn(sent, rng)
        out.append(sent)
    if on.get("bullets"):
        mark = rng.choice(["・", "- ", "● "])
        body = "\n".join(mark + x.rstrip("。") if mark != "・" else mark + x for x in out)
    else:
        body = ("\n" if on.get("newlines") else "").join(out)
    if on.get("heading"):
        body = rng.choice(HEADINGS[section]) + "\n" + body
    return body


# ---------------------------------------------------------------------------------------------


def month_list(k: int) -> list[str]:
    y, m = FIRST_MONTH
    out = []
    for i in range(k):
        yy, mm = divmod(m - 1 + i, 12)
        out.append(f"{y + yy:04d}-{mm + 1:02d}")
    return out


def generate_pairs(n: int, seed: int) -> list[dict]:
    """``n`` rows {date, section, fund, manager, draft, final}, sorted by date, fund, section.

    Each (fund, month, section) appears at most once, spread evenly over at least MIN_MONTHS
    months (more when n needs them); the facts of one fund and month are shared by its sections.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    funds = list(FUNDS)
    per_month = len(funds) * len(SECTIONS)
    months = month_list(max(MIN_MONTHS, -(-n // per_month)))
    # choose n cells: round-robin over months so every month gets about n / len(months) rows
    cells_by_month = {}
    for mth in months:
        cells = [(f, sec) for f in funds for sec in SECTIONS]
        rng.shuffle(cells)
        cells_by_month[mth] = cells
    chosen = [(months[i % len(months)], *cells_by_month[months[i % len(months)]][i // len(months)])
              for i in range(n)]
    chosen.sort(key=lambda c: (c[0], funds.index(c[1]), SECTIONS.index(c[2])))
    series = draw_series(rng, len(months))
    rows = []
    for date, fund, section in chosen:
        spec = FUNDS[fund]
        final = final_sentences(spec["kind"], section, series[fund][months.index(date)])
        rows.append({"date": date, "section": section, "fund": fund, "manager": spec["manager"],
                     "draft": make_draft(final, section, spec["manager"], rng), "final": "".join(final)})
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    """Write rows as .jsonl/.csv/.xlsx (by suffix) through a temp file + rename."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".xlsx"):
        raise ValueError(f"{path}: unsupported suffix {suffix!r} (use .jsonl, .csv or .xlsx)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; this is an ordinary data file
    try:
        if suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        elif suffix == ".csv":
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(rows)
        else:
            from openpyxl import Workbook
            wb = Workbook()
            ws = wb.active
            ws.title = "pairs"
            ws.append(list(COLUMNS))
            for r in rows:
                ws.append([r[c] for c in COLUMNS])
            wb.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m recipes.synth_data", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True, help="number of draft/final pairs")
    ap.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic for n, seed)")
    ap.add_argument("--output", type=Path, required=True, help="output file: .jsonl, .csv or .xlsx")
    args = ap.parse_args(argv)
    rows = generate_pairs(args.n, args.seed)
    write_rows(rows, args.output)
    months = sorted({r["date"] for r in rows}) or ["-"]
    print(f"wrote {len(rows)} pairs ({months[0]} .. {months[-1]}) to {args.output}")


if __name__ == "__main__":
    main()
