"""Write the LongBench test fixtures: ``tests/data/longbench/{task}.jsonl`` and ``{task}_e.jsonl``.

Every text here was written for kvbench's tests (nothing is taken from LongBench); only the format
is the official one (fields ``input``, ``context``, ``answers``, ``length``, ``dataset``,
``language``, ``all_classes``, ``_id``), with each task's shape (passages, few-shot examples, code)
imitated so that the prompt templates, the truncation and every metric get exercised.

Per task: a short example (a few dozen tokens) and a longer one (the same kind of content plus
filler paragraphs, a few hundred tokens), so a test with a small ``max_prompt_tokens`` truncates
one and not the other. Each ``_e`` file holds three examples whose ``length`` field is set to
1500, 5200 and 9100 so that every LongBench-E bucket (0-4k, 4-8k, 8k+) is hit; in the v1 files
``length`` is computed as the official data does (words of context + input + answers for English
and code, characters for Chinese).

The output is deterministic; the files are committed. Run from the repository root:
``.venv/bin/python scripts/make_longbench_fixtures.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvbench.scoring.longbench import E_TASKS, TASKS  # noqa: E402

OUT = ROOT / "tests" / "data" / "longbench"

FILLER_EN = [
    "The harbour town kept its old customs long after the railway arrived.",
    "Every spring the council repainted the benches along the river walk.",
    "A small museum near the square displayed maps drawn by local sailors.",
    "Farmers from the valley sold apples and cheese at the Saturday market.",
    "The library opened a reading room for children in the former post office.",
    "Storms in late autumn often closed the coastal road for several days.",
    "Visitors liked to climb the hill behind the church to watch the ferries.",
    "The bakery on Mill Lane was famous for a bread made with dark rye flour.",
    "An engineer from the capital designed the new footbridge over the canal.",
    "Most houses in the old quarter were built from grey stone and slate.",
]
FILLER_ZH = [
    "这座小城的老街保留了许多传统的木结构房屋。",
    "每年春天，河边的柳树发芽，居民们喜欢在傍晚散步。",
    "城东的菜市场每天清晨都很热闹，摊主们早早开始叫卖。",
    "当地图书馆新设了一间儿童阅览室，周末常常坐满了人。",
    "秋天雨水较多，山路有时会因为塌方而暂时封闭。",
    "镇上的面馆已经开了三十年，招牌是手工拉面。",
]
FILLER_CODE = [
    "def _clamp(value, low, high):",
    "    return max(low, min(high, value))",
    "",
    "def _mean(values):",
    "    values = list(values)",
    "    return sum(values) / len(values) if values else 0.0",
    "",
    "class Counter:",
    "    def __init__(self):",
    "        self.count = 0",
    "",
    "    def increment(self, step=1):",
    "        self.count += step",
    "        return self.count",
    "",
]


def filler_en(n: int, sep: str = " ") -> str:
    return sep.join(FILLER_EN[i % len(FILLER_EN)] for i in range(n))


def filler_zh(n: int) -> str:
    return "".join(FILLER_ZH[i % len(FILLER_ZH)] for i in range(n))


def passages(items: list[tuple[str, str]], label: str = "Passage") -> str:
    return "\n".join(f"{label} {i}:\n{title}\n{text}" for i, (title, text) in enumerate(items, 1))


def ex(input: str, context: str, answers: list[str], all_classes: list[str] | None = None) -> dict:
    return {"input": input, "context": context, "answers": answers, "all_classes": all_classes}


# ---------------------------------------------------------------------------------------------
# Hand-written examples, two per task: [short, long]
# ---------------------------------------------------------------------------------------------

STORY = (
    "Mara kept the lighthouse on Gull Rock for eleven winters. Each evening she climbed the "
    "ninety steps, trimmed the wick and wound the clockwork that turned the lens. When the "
    "fishing boat Heron lost its rudder in a gale, Mara rowed out in her red dinghy and towed "
    "the crew to the lee of the rock, where they waited until dawn."
)
ARTICLE = (
    "Abstract: We study a tiny recurrent model for tagging bird calls. Introduction: Bird call "
    "tagging helps ecologists count species. Method: The model reads spectrogram frames with a "
    "single gated layer of 64 units and was trained on 3,200 labelled recordings from two "
    "forests. Results: It reaches 81 percent accuracy, four points above a convolutional "
    "baseline. Limitations: We did not test recordings made in cities."
)
BRIDGE = (
    "The Kessel Bridge crosses the Arn river at the town of Lindau. It was designed by the "
    "engineer Ilse Varga and opened in 1931. The bridge is 212 metres long and carries a road "
    "and a narrow footpath. After a flood in 1987 the two central piers were rebuilt with "
    "concrete, and the original iron railings were moved to the town museum."
)
ZH_DOC = (
    "青石镇位于山谷北侧，以出产竹编工艺品闻名。镇上最有名的匠人是王秀兰，她从十六岁开始学习"
    "竹编，至今已有四十年。二零一五年，镇政府在老粮仓里建立了竹编博物馆，展出了三百多件作品。"
    "每年十月，这里都会举办竹编节，吸引周边城市的游客前来参观。"
)
MULTIHOP = [
    ("Orla Finch", "Orla Finch is a composer who wrote the opera The Salt Road. She was born in "
     "the port city of Vessen."),
    ("Vessen", "Vessen is a port city on the northern coast. Its main square is named after the "
     "mapmaker Tomas Brey."),
    ("The Salt Road", "The Salt Road is an opera in three acts, first performed in 1962 at the "
     "Royal Hall."),
]
MULTIHOP_2 = [
    ("Glenmoor Academy", "Glenmoor Academy is a school founded in 1874 by the botanist Hilda Roe."),
    ("Hilda Roe", "Hilda Roe was a botanist who studied ferns. She died in the town of Carrow."),
    ("Pell Observatory", "Pell Observatory was founded in 1902 by the astronomer Edwin Pell."),
]
DUREADER = passages([
    ("如何保存新鲜的茶叶", "新鲜茶叶应当放在密封罐中，避免阳光直射，并放在阴凉干燥的地方。"
     "绿茶最好冷藏保存，这样可以保持香气。"),
    ("茶叶受潮怎么办", "茶叶受潮后可以用小火慢慢烘干，但不要烘焦。"),
], label="文章")
REPORT = (
    "The Office of Rural Water reviewed 48 small water systems in 2021. Twelve systems did not "
    "test for lead as often as required. Most of these systems serve fewer than 500 people and "
    "rely on part-time operators. The office recommends a shared testing contract and training "
    "for operators."
)
TRANSCRIPT = (
    "Chair: Let us start with the budget for the new playground.\n"
    "Lena: The quote from the builder is forty thousand pounds.\n"
    "Omar: That is more than we planned. Could we use recycled rubber for the surface?\n"
    "Lena: Yes, that would save about six thousand.\n"
    "Chair: Then we agree to ask for a revised quote with the recycled surface."
)
NEWS = passages([
    ("", "A new ferry line between Port Ellis and Skarn Island starts on Monday. Two boats will "
     "run six times a day."),
    ("", "Islanders welcomed the ferry service, which cuts the trip to the mainland from three "
     "hours to fifty minutes."),
])
VCSUM = (
    "主持人：今天我们讨论社区图书馆的开放时间。\n"
    "李明：很多居民希望晚上也能借书，建议延长到晚上九点。\n"
    "张华：延长时间需要增加两名志愿者。\n"
    "主持人：那我们先试行三个月，再根据借阅情况决定是否继续。"
)
TREC_CLASSES = ["Location", "City", "Country", "Person", "Date", "Number", "Description",
                "Definition", "Reason", "Manner", "Animal", "Food", "Color", "Other"]
TREC_SHOTS = [
    ("Which city hosts the glass museum of the northern coast ?", "City"),
    ("When did the first tram run in the capital ?", "Date"),
    ("How many strings does a viola have ?", "Number"),
    ("Who painted the ceiling of the old opera house ?", "Person"),
    ("Why do owls hunt at night ?", "Reason"),
    ("What is a fjord ?", "Definition"),
]
LSHT_CLASSES = ["体育", "财经", "科技", "教育", "娱乐", "军事"]
LSHT_SHOTS = [
    ("市队在昨晚的比赛中以三比一获胜，晋级半决赛。", "体育"),
    ("央行宣布下调存款准备金率，股市应声上涨。", "财经"),
    ("研究团队发布了一款新的开源语音识别模型。", "科技"),
    ("多所中学将在下学期开设编程选修课。", "教育"),
]
TRIVIA_SHOTS = [
    ("The river Tamsin flows through the city of Dorrow before reaching the sea.",
     "Which city does the river Tamsin flow through?", "Dorrow"),
    ("The clockmaker Ada Lisle built the tower clock of Fenwick in 1843.",
     "Who built the tower clock of Fenwick?", "Ada Lisle"),
]
SAMSUM_SHOTS = [
    ("Jon: Are you coming to the match?\nEva: Yes, I'll bring snacks.\nJon: Great, see you at six.",
     "Eva will come to the match at six and bring snacks."),
    ("Tom: My car broke down.\nSara: Do you need a lift?\nTom: Yes please, to the station.",
     "Sara will give Tom a lift to the station because his car broke down."),
]
PARAGRAPHS = [
    "The glassworks of Hollin made blue bottles for apothecaries across the region.",
    "A rail tunnel under the Verr pass was finished after nine years of digging.",
    "The painter Ines Dahl spent her last years on an island without electricity.",
    "Marsh orchids bloom in June on the wet meadows south of the lake.",
    "The town choir of Elbe Rest won a national prize with a song about fishermen.",
]
PARAGRAPHS_ZH = [
    "这家玻璃厂曾为全省的药店生产蓝色药瓶。",
    "穿越山口的铁路隧道历时九年才完工。",
    "画家晚年住在一座没有电的小岛上。",
    "每年六月，湖南岸的湿地草甸上开满了兰花。",
]
LCC_CODE = (
    "import json\n\n\n"
    "def load_settings(path):\n"
    "    with open(path) as f:\n"
    "        data = json.load(f)\n"
    "    settings = {}\n"
    "    for key, value in data.items():\n"
    "        settings[key.lower()] = value\n"
)
REPO_CONTEXT = (
    "# Path: shop/cart.py\n"
    "class Cart:\n"
    "    def __init__(self):\n"
    "        self.items = []\n\n"
    "    def add(self, name, price):\n"
    "        self.items.append((name, price))\n\n"
    "    def total(self):\n"
    "        return sum(price for _, price in self.items)\n"
)
REPO_INPUT = (
    "# Path: shop/checkout.py\n"
    "from shop.cart import Cart\n\n\n"
    "def checkout(names_and_prices):\n"
    "    cart = Cart()\n"
    "    for name, price in names_and_prices:\n"
    "        cart.add(name, price)\n"
)


def few_shot(shots, fmt) -> str:
    return "\n".join(fmt(*shot) for shot in shots)


def examples() -> dict[str, list[dict]]:
    long_en = filler_en(14)
    trec_fmt = lambda q, t: f"Question: {q}\nType: {t}"  # noqa: E731
    lsht_fmt = lambda q, t: f"新闻内容：{q}\n类别：{t}"  # noqa: E731
    trivia_fmt = lambda p, q, a: f"Passage: {p}\nQuestion: {q}\nAnswer: {a}\n"  # noqa: E731
    samsum_fmt = lambda d, s: f"Dialogue: {d}\nSummary: {s}\n"  # noqa: E731

    def numbered(paras, label="Paragraph ", sep=": "):
        return "\n\n".join(f"{label}{i}{sep}{p}" for i, p in enumerate(paras, 1))

    count_paras_1 = [PARAGRAPHS[0], PARAGRAPHS[1], PARAGRAPHS[0]]  # 2 unique
    count_paras_2 = [PARAGRAPHS[2], PARAGRAPHS[3], PARAGRAPHS[2], PARAGRAPHS[4]] + FILLER_EN[:6]
    return {
        "narrativeqa": [
            ex("What colour was Mara's dinghy?", STORY, ["red", "It was red."]),
            ex("How many steps did Mara climb each evening?", f"{long_en}\n\n{STORY}\n\n{long_en}",
               ["ninety", "90 steps"]),
        ],
        "qasper": [
            ex("How many units does the gated layer have?", ARTICLE, ["64", "64 units"]),
            ex("Was the model tested on city recordings?", f"{ARTICLE} {long_en}", ["no"]),
        ],
        "multifieldqa_en": [
            ex("Who designed the Kessel Bridge?", BRIDGE, ["Ilse Varga"]),
            ex("Where are the original iron railings now?", f"{long_en}\n{BRIDGE}\n{long_en}",
               ["in the town museum"]),
        ],
        "multifieldqa_zh": [
            ex("竹编博物馆建在哪里？", ZH_DOC, ["老粮仓"]),
            ex("王秀兰学习竹编多少年了？", filler_zh(6) + ZH_DOC + filler_zh(6), ["四十年"]),
        ],
        "hotpotqa": [
            ex("In which city was the composer of The Salt Road born?", passages(MULTIHOP),
               ["Vessen"]),
            ex("Who is the main square of the birthplace of Orla Finch named after?",
               passages(MULTIHOP + [("Harbour towns", long_en)]), ["Tomas Brey"]),
        ],
        "2wikimqa": [
            ex("Where did the founder of Glenmoor Academy die?", passages(MULTIHOP_2), ["Carrow"]),
            ex("Which was founded first, Glenmoor Academy or Pell Observatory?",
               passages(MULTIHOP_2 + [("Old towns", long_en)]), ["Glenmoor Academy"]),
        ],
        "musique": [
            ex("In what year was the opera by the composer born in Vessen first performed?",
               passages(MULTIHOP), ["1962"]),
            ex("What did the founder of Glenmoor Academy study?",
               passages([("Town notes", long_en)] + MULTIHOP_2), ["ferns"]),
        ],
        "dureader": [
            ex("绿茶怎么保存？", DUREADER, ["绿茶最好放在密封罐中冷藏保存，避免阳光直射。"]),
            ex("茶叶受潮了怎么办？", DUREADER + "\n" + filler_zh(10), ["可以用小火慢慢烘干，但不要烘焦。"]),
        ],
        "gov_report": [
            ex("", REPORT, ["Twelve of 48 small water systems did not test for lead often "
                            "enough; the office recommends shared testing and operator training."]),
            ex("", f"{REPORT}\n{filler_en(16, chr(10))}", ["Small water systems often missed "
                                                          "required lead tests."]),
        ],
        "qmsum": [
            ex("What did the group decide about the playground?", TRANSCRIPT,
               ["They agreed to ask the builder for a revised quote with a recycled rubber "
                "surface."]),
            ex("How much would the recycled surface save?", f"{TRANSCRIPT}\n{filler_en(14, chr(10))}",
               ["About six thousand pounds."]),
        ],
        "multi_news": [
            ex("", NEWS, ["– A ferry between Port Ellis and Skarn Island starts Monday, cutting "
                          "the trip to fifty minutes."]),
            ex("", f"{NEWS}\n{passages([('', long_en)])}", ["– Skarn Island gets a new ferry "
                                                           "line with six daily trips."]),
        ],
        "vcsum": [
            ex("", VCSUM, ["会议决定社区图书馆延长开放时间，先试行三个月。"]),
            ex("", VCSUM + "\n" + filler_zh(10), ["图书馆计划延长开放到晚上九点，需要增加志愿者。"]),
        ],
        "trec": [
            ex("Question: What country is the island of Skarn part of ?\nType:",
               few_shot(TREC_SHOTS[:3], trec_fmt), ["Country"], TREC_CLASSES),
            ex("Question: Who founded the glassworks of Hollin ?\nType:",
               few_shot(TREC_SHOTS * 4, trec_fmt), ["Person"], TREC_CLASSES),
        ],
        "triviaqa": [
            ex("Passage: The lake of Orrin freezes every January.\nQuestion: Which lake freezes "
               "every January?\nAnswer:", few_shot(TRIVIA_SHOTS, trivia_fmt),
               ["Orrin", "lake Orrin", "the lake of Orrin"]),
            ex("Passage: The poet Cal Mercer wrote Winter Harbour.\nQuestion: Who wrote Winter "
               "Harbour?\nAnswer:", few_shot(TRIVIA_SHOTS * 5, trivia_fmt),
               ["Cal Mercer", "Mercer"]),
        ],
        "samsum": [
            ex("Dialogue: Ana: Lunch at noon?\nBen: Can we make it one?\nAna: Sure.\nSummary:",
               few_shot(SAMSUM_SHOTS, samsum_fmt), ["Ana and Ben will have lunch at one."]),
            ex("Dialogue: Kim: I lost my keys.\nLeo: Check the kitchen.\nKim: Found them!\n"
               "Summary:", few_shot(SAMSUM_SHOTS * 4, samsum_fmt),
               ["Kim found her lost keys in the kitchen after Leo's hint."]),
        ],
        "lsht": [
            ex("新闻内容：国家队主教练公布了新一期集训名单。\n类别：", few_shot(LSHT_SHOTS, lsht_fmt),
               ["体育"], LSHT_CLASSES),
            ex("新闻内容：一家初创公司推出了可折叠屏幕的平板电脑。\n类别：",
               few_shot(LSHT_SHOTS * 4, lsht_fmt), ["科技"], LSHT_CLASSES),
        ],
        "passage_count": [
            ex("", numbered(count_paras_1), ["2"]),
            ex("", numbered(count_paras_2), ["9"]),
        ],
        "passage_retrieval_en": [
            ex("A glass factory produced blue bottles for pharmacies.", numbered(PARAGRAPHS[:3]),
               ["Paragraph 1"]),
            ex("The choir of a small town won a national prize with a song about fishermen.",
               numbered(FILLER_EN[:6] + PARAGRAPHS), ["Paragraph 11"]),
        ],
        "passage_retrieval_zh": [
            ex("一条铁路隧道花了九年时间建成。", numbered(PARAGRAPHS_ZH, "段落", "："), ["段落2"]),
            ex("湿地上的兰花在六月开放。", numbered(FILLER_ZH + PARAGRAPHS_ZH, "段落", "："), ["段落10"]),
        ],
        "lcc": [
            ex("", LCC_CODE, ["    return settings"]),
            ex("", "\n".join(FILLER_CODE * 3) + "\n" + LCC_CODE, ["    return settings"]),
        ],
        "repobench-p": [
            ex(REPO_INPUT, REPO_CONTEXT, ["    return cart.total()"]),
            ex(REPO_INPUT, "# Path: shop/util.py\n" + "\n".join(FILLER_CODE * 3) + "\n" + REPO_CONTEXT,
               ["    return cart.total()"]),
        ],
    }


def length(example: dict, language: str) -> int:
    """The official ``length``: characters for Chinese, words otherwise (context+input+answers)."""
    text = example["context"] + example["input"] + "".join(example["answers"])
    if language == "zh":
        return len("".join(text.split()))
    return len(text.split())


def make_id(name: str, index: int) -> str:
    return hashlib.sha256(f"kvbench-fixture/{name}/{index}".encode()).hexdigest()[:48]


def records(task: str, variant: str, items: list[dict]) -> list[dict]:
    language = TASKS[task]["language"]
    name = task if variant == "v1" else f"{task}_e"
    if variant == "e":
        items = [items[0], items[1], items[0]]
    out = []
    for i, item in enumerate(items):
        out.append({
            "input": item["input"],
            "context": item["context"],
            "answers": item["answers"],
            # LongBench-E fixtures: one example per length bucket
            "length": (1500, 5200, 9100)[i] if variant == "e" else length(item, language),
            "dataset": name,
            "language": language,
            "all_classes": item["all_classes"],
            "_id": make_id(name, i),
        })
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data = examples()
    assert list(data) == list(TASKS), "one entry per LongBench task, in table order"
    for task, items in data.items():
        variants = ["v1", "e"] if task in E_TASKS else ["v1"]
        for variant in variants:
            name = task if variant == "v1" else f"{task}_e"
            lines = [json.dumps(r, ensure_ascii=False) for r in records(task, variant, items)]
            (OUT / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(list(OUT.glob('*.jsonl')))} files to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
