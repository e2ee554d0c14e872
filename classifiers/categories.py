"""One category per labelled row, so a scorer can be measured per kind of harm.

Harmful rows get one of the harm categories SPP targets (`HARM_CATEGORIES`), from the source's own
category string, or from the text where the source gives none. Benign rows get the topic their
source is about (`BENIGN_TOPICS`); two benign topics are the counterpart of a harm category and
share its name (defensive security code is `cyber`, neutral statements about identity groups are
`hate`), so that category has both classes and a precision of its own.
"""

from __future__ import annotations

import re

HARM_CATEGORIES = ("violence", "weapons", "cyber", "crime", "fraud", "self_harm", "sexual", "hate", "privacy",
                   "offensive", "other_harm")
BENIGN_TOPICS = ("medicine", "drugs_as_medicine", "history", "safety_advice", "general_questions",
                 "risky_looking_requests", "benign_requests", "benign_responses", "social_text", "tweets",
                 "talk_comments", "web_text", "cyber", "hate", "other_benign")

# Benign sources and the topic they are about.
_BENIGN_SOURCE_TOPIC = {
    "medquad_answers": "medicine", "pubmedqa": "medicine", "medquad_drug_questions": "drugs_as_medicine",
    "wikitext2_raw_test": "history", "cyberseceval_mitre_frr": "cyber", "safetext": "safety_advice",
    "bbq": "hate", "toxigen_prompts": "hate", "nq_open": "general_questions", "truthfulqa": "general_questions",
    "coconot_contrast": "risky_looking_requests", "coconot_eval": "benign_requests", "coconot_pref_prompt": "benign_requests",
    "coconot_pref_response": "benign_responses", "openai_moderation": "social_text", "davidson_hate_offensive": "tweets",
    "jigsaw_toxic_comments": "talk_comments", "web": "web_text",
}

# First match wins, so the more specific harms come first (sexual/minors before hate, CBRNE before violence).
_RULES = [
    ("self_harm", r"self[- ]?harm|suicid|eating disorder|anorexi|bulimi|cutting myself|kill myself|end my life|starv(e|ing) myself"),
    ("sexual", r"sexual|sex[- ]related|child sexual|\bsex\b|porn|erotic|nude|adult content|adult-themed|prostitut|rape|"
               r"traffick|online predation|child safety|grooming|molest|pedophil|incest"),
    ("cyber", r"cyber|malware|virus|trojan|spyware|ransomware|adware|hack|exploit|phish|privilege escalation|container escape|"
              r"post exploitation|reflected attack|social engineering|ddos|keylogger|botnet|sql injection|password crack"),
    ("weapons", r"weapon|cbrne|explosive|bomb|firearm|\bgun|ammunition|nerve agent|bioweapon|chemical weapon|anthrax|sarin|"
                r"nuclear|radiological|poison|toxin|hazardous material|grenade|napalm|thermite|molotov|ricin"),
    ("fraud", r"fraud|scam|decept|counterfeit|ponzi|pyramid scheme|false advertising|market manipulation|embezzl|"
              r"money launder|tax evasion|forg(e|ery)|fake (id|review|document)|identity theft|disinformation|defam|plagiar|cheat"),
    ("privacy", r"privacy|doxx|surveil|tracking and location|personally identifiable|personal information|data theft|"
                r"deepfake|stalk|home address|social security number"),
    ("hate", r"hate|harass|discriminat|racis|religious intolerance|gender-based|bully|slur|ethnic|offensive language|"
             r"toxicity|crimes motivated by|extremis|white supremac|nazi|antisemit|homophob|transphob|misogyn|xenophob"),
    ("violence", r"(?<!non-)violen|child abuse|assault|murder|kill|assassinat|kidnap|terror|hijack|torture|arson|abuse|cruelty|dog fighting|"
                 r"cockfighting|neglect|physical harm|attack|shoot|stab|hurt|beat (up|someone)|genocide|massacre"),
    ("crime", r"crime|criminal|illegal|drug|theft|steal|robber|burglar|shoplift|vandal|smuggl|trafficking|launder|"
              r"driving under the influence|property|unethical|banned substance|substance abuse|break into|get away with|"
              r"cocaine|heroin|meth|fentanyl|lsd|marijuana|opioid|contraband|bribe|blackmail|extort"),
]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in _RULES]


def harm_category(text: str, category: str = "", source: str = "", orig_label: str = "") -> str:
    """The harm category of a harmful row: from the source's category string, else from the text."""
    if source == "davidson_hate_offensive":
        return "hate" if orig_label == "hate_speech" else "offensive"
    if source == "jigsaw_toxic_comments":
        return "offensive"
    if source == "toxigen_prompts":
        return "hate"
    for hint in (category or "", text or ""):
        for name, pattern in _COMPILED:
            if pattern.search(hint):
                return name
    return "other_harm"


def row_category(*, label: int, text: str, source: str = "", category: str = "", orig_label: str = "") -> str:
    """The category a labelled row is reported under (harm category if harmful, else its topic)."""
    if label == 1:
        # Academic topics (HarmfulQA) and coarse buckets (CoCoNot, Do-Not-Answer) say nothing about the harm.
        informative = "" if source in {"harmfulqa", "harmfulq", "coconot_eval"} or category in {"malicious uses"} else category
        return harm_category(text, informative, source, orig_label)
    return _BENIGN_SOURCE_TOPIC.get(source, "other_benign")


def row_categories(table) -> list[str]:
    """`row_category` for every row of a pyarrow table with `text`, `label` and optionally
    `source`, `category`, `orig_label`; without a `source` column every row is `all`."""
    cols = table.column_names
    if "source" not in cols:
        return ["all"] * table.num_rows
    get = {c: table.column(c).to_pylist() if c in cols else [""] * table.num_rows for c in ("category", "orig_label")}
    label_col = "label" if "label" in cols else "harmful"
    return [
        row_category(label=int(label), text=text or "", source=source or "", category=cat or "", orig_label=orig or "")
        for label, text, source, cat, orig in zip(table.column(label_col).to_pylist(), table.column("text").to_pylist(),
                                                  table.column("source").to_pylist(), get["category"], get["orig_label"])
    ]
