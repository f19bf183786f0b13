"""WebShop (Yao et al., NeurIPS 2022, arXiv 2207.01206) behind the env manager's backend API.

SIRI reports WebShop next to ALFWorld. The real WebShop needs its own product dump, search
index (Lucene/pyserini) and spaCy model, which cannot be downloaded on CI machines, so the
default is an *embedded* shop built from a catalogue our own code generates:

* five categories as in WebShop (beauty, electronics, fashion, food, furniture), 30 product
  types, products with title, attributes, options (size/color/flavor/...), price,
  description, features and reviews;
* instructions generated from a target product, phrased like WebShop's synthetic goals
  ("i need ... with color: x, and size: y, and price lower than 40.00 dollars");
* WebShop's pages and actions: ``search[query]``; results (10 a page, top 50, BM25 ranking
  from the rank_bm25 package) with ``click[<item id>]``, ``click[next >]``, ``click[< prev]``,
  ``click[back to search]``; item page with ``click[<option>]``, ``click[description]``,
  ``click[features]``, ``click[reviews]``, ``click[buy now]``; ``click[< prev]`` goes back;
* WebShop's reward (``webshop_reward``), with success = reward 1.

Rewards, as for ALFWorld (DESIGN): the backend pays 10 x won on the buying step (won = WebShop
reward 1) and reports WebShop's own reward in [0, 1] as info["score"] (EnvState.score), from
which evaluation reports WebShop's two numbers (``summarize``: score = 100 x mean, success rate).
The knobs are this module's config section, `WebShopConfig` (``env.webshop.*``); the catalogue and
goals also follow env.seed. Episodes are capped by the manager (env.max_steps; 15 in GiGPO's WebShop
setting, ``python siri.py env=webshop``). The prompt template and the action grammar are here too
(`WebShop.build_prompt`, `WebShop.parse_action`); `EmbeddedWebShop` and `RealWebShop` are the two
backends, chosen once by envs.backend_class.
``source == "real"`` drives a local WebShop checkout in-process (``RealWebShop``): its text
pages with the instruction cut (the prompt shows it) and the chosen options noted, its human
goals split as its baseline's (test 0-499, train 1500+), our random state kept apart from its
own, and no expert walkthrough (so no cold start); without one, ``WebShopNotInstalled`` says
what to install. ``python webshop.py bench``: catalogue size, step latency, a scripted buyer's
score / success rate; ``python webshop.py agree PATH``: our reward against WebShop's own option
and attribute rules from the checkout at PATH, on 5,000 purchases.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np
from rank_bm25 import BM25Okapi

from core import ANSWER, WIN_REWARD, EnvState, collapse, extract_action, history_block


class WebShopNotInstalled(RuntimeError):
    """source == "real" was asked for but WebShop is not usable: no checkout at env.webshop.path,
    its packages, product data or search index missing, or too few goals for the train split."""


@dataclass
class WebShopConfig:
    """The WebShop section of the environment config (``env.webshop.*``)."""

    num_products: int = 1000
    """catalogue size (embedded: products generated; real: WebShop's product subset, 1000 = the data of its
    `setup.sh -d small`, 0 = all)"""
    num_train_goals: int = 2000
    """goals in the train split (embedded: the goals after the eval ones; real: WebShop's baseline train
    split, goals 1500 on, capped by what WebShop has)"""
    num_eval_goals: int = 500
    """goals in the fixed eval split, goals 0..N-1, as WebShop's test split (and GiGPO's) is goals[:500]
    (real: at most 1500, its test and val goals)"""
    path: str = ""
    """real: root of a princeton-nlp/WebShop checkout after its setup.sh ("" = none)"""

    def __post_init__(self):
        for key in ("num_products", "num_train_goals", "num_eval_goals"):
            if getattr(self, key) < 0:
                raise ValueError(f"env.webshop.{key}={getattr(self, key)}: must be >= 0")

    def check_real(self) -> None:
        """The limits of a real WebShop checkout: its search indexes and its baseline's splits."""
        if self.num_products not in (0, 100, 1000, 100000):
            raise ValueError(f"env.webshop.num_products={self.num_products}: real WebShop has search indexes for "
                             "100, 1000 or 100000 products, or 0 for all")
        if self.num_eval_goals > 1500:
            raise ValueError(f"env.webshop.num_eval_goals={self.num_eval_goals}: real WebShop's train split starts at "
                             "goal 1500, so at most 1500")


# ---------------------------------------------------------------------------------------
# Catalogue: product types per category. Columns: query (what instructions ask for),
# product_category breadcrumb, title heads, nouns of those heads (our stand-in for spaCy's
# noun tags, see title_nouns), attribute pool, option groups, price range in dollars.
# Our choice: no two values of one option group match under WebShop's fuzzy option rule
# (option_matches: "x-large" would meet "large", "20 count" "50 count"), so a wrong click never
# scores; hence "xl", and size numbers that share few digits.
# ---------------------------------------------------------------------------------------
BEAUTY, ELEC, FASH, FOOD, FURN = ("Beauty & Personal Care", "Electronics", "Clothing, Shoes & Jewelry",
                                  "Grocery & Gourmet Food", "Home & Kitchen › Furniture")
SIZES = ["small", "medium", "large", "xl"]
TYPES = {
    "beauty": [
        ("lipstick", f"{BEAUTY} › Makeup › Lips › Lipstick",
         ["Matte Lipstick", "Liquid Lipstick", "Lipstick Set"], "lipstick set",
         ["long lasting", "cruelty free", "highly pigmented", "paraben free", "moisturizing formula"],
         {"color": ["ruby red", "nude", "pink", "berry", "coral", "plum"]}, (6, 28)),
        ("eyeshadow palette", f"{BEAUTY} › Makeup › Eyes › Eyeshadow",
         ["Eyeshadow Palette", "Shimmer Eyeshadow Palette", "Eyeshadow Kit"], "eyeshadow palette kit",
         ["long lasting", "cruelty free", "easy to blend", "highly pigmented", "travel size"],
         {"color": ["warm neutrals", "smoky", "rose gold", "sunset"]}, (8, 40)),
        ("shampoo", f"{BEAUTY} › Hair Care › Shampoo & Conditioner › Shampoo",
         ["Shampoo", "Volumizing Shampoo", "Repair Shampoo"], "shampoo",
         ["sulfate free", "paraben free", "natural ingredients", "dry hair", "color safe"],
         {"scent": ["coconut", "lavender", "unscented", "tea tree"], "size": ["8 fl oz", "16 fl oz", "32 fl oz"]}, (7, 35)),
        ("hair extensions", f"{BEAUTY} › Hair Care › Hair Extensions, Wigs & Accessories › Extensions",
         ["Clip In Hair Extensions", "Hair Extensions", "Tape In Hair Extensions"], "hair extensions",
         ["natural looking", "heat resistant", "high quality", "easy to apply", "human hair"],
         {"color": ["jet black", "dark brown", "honey blonde", "auburn"], "size": ["14 inch", "20 inch", "36 inch"]}, (15, 90)),
        ("face moisturizer", f"{BEAUTY} › Skin Care › Face › Moisturizers",
         ["Face Moisturizer", "Night Moisturizer Cream", "Daily Face Moisturizer"], "face moisturizer cream",
         ["fragrance free", "sensitive skin", "hyaluronic acid", "non greasy", "dermatologist tested"],
         {"size": ["1.7 oz", "3.4 oz"]}, (10, 60)),
        ("nail polish", f"{BEAUTY} › Foot, Hand & Nail Care › Nail Art & Polish › Nail Polish",
         ["Nail Polish", "Gel Nail Polish", "Nail Polish Set"], "nail polish set",
         ["quick dry", "long lasting", "non toxic", "chip resistant", "cruelty free"],
         {"color": ["classic red", "baby pink", "navy", "nude beige", "glitter silver"]}, (4, 25)),
    ],
    "electronics": [
        ("wireless earbuds", f"{ELEC} › Headphones, Earbuds & Accessories › Headphones & Earbuds › Earbud Headphones",
         ["Wireless Earbuds", "Sport Earbuds", "True Wireless Earbuds"], "earbuds",
         ["noise cancelling", "water resistant", "long battery life", "fast charging", "built in microphone"],
         {"color": ["black", "white", "navy blue", "rose gold"]}, (15, 120)),
        ("portable speaker", f"{ELEC} › Portable Audio & Video › Portable Speakers & Docks › Portable Wireless Speakers",
         ["Portable Speaker", "Wireless Speaker", "Outdoor Speaker"], "speaker",
         ["water resistant", "long battery life", "high fidelity", "easy to carry", "built in microphone"],
         {"color": ["black", "blue", "red", "gray"]}, (20, 150)),
        ("phone case", f"{ELEC} › Cell Phones & Accessories › Cases, Holsters & Sleeves › Basic Cases",
         ["Phone Case", "Slim Phone Case", "Rugged Phone Case"], "phone case",
         ["shock absorbing", "slim fit", "wireless charging compatible", "scratch resistant", "easy to install"],
         {"color": ["clear", "black", "pink", "midnight green"], "size": ["iphone 15", "galaxy s24", "pixel 8"]}, (6, 30)),
        ("hdmi cable", f"{ELEC} › Computers & Accessories › Cables & Accessories › Cables & Interconnects › HDMI Cables",
         ["HDMI Cable", "High Speed HDMI Cable", "Braided HDMI Cable"], "hdmi cable",
         ["high speed", "gold plated", "braided cord", "ultra hd", "easy to install"],
         {"size": ["3 ft", "6 ft", "10 ft", "15 ft"]}, (5, 25)),
        ("usb c charger", f"{ELEC} › Computers & Accessories › Laptop Accessories › Chargers & Adapters",
         ["USB C Charger", "Fast Wall Charger", "Wall Charger"], "usb charger wall",
         ["fast charging", "compact design", "overheat protection", "dual port", "travel size"],
         {"color": ["white", "black"], "style": ["20w", "45w", "65w"]}, (10, 50)),
        ("tv wall mount",
         f"{ELEC} › Television & Video › Accessories › TV Mounts, Stands & Turntables › TV Wall & Ceiling Mounts",
         ["TV Wall Mount", "Full Motion TV Mount", "Tilting TV Wall Mount"], "tv wall mount motion",
         ["heavy duty", "easy to install", "full motion", "space saving", "cable management"],
         {"size": ["32 to 55 inch", "42 to 70 inch", "60 to 90 inch"]}, (20, 90)),
    ],
    "fashion": [
        ("running shoes", f"{FASH} › Men › Shoes › Athletic › Running",
         ["Running Shoes", "Trail Running Shoes", "Road Running Shoes"], "shoes trail road",
         ["non slip", "lightweight", "breathable mesh", "arch support", "rubber sole"],
         {"color": ["black white", "gray", "navy", "red"], "size": ["7", "8", "9", "10", "11", "12"]}, (30, 140)),
        ("t-shirt", f"{FASH} › Men › Clothing › Shirts › T-Shirts",
         ["Crew Neck T-Shirt", "Graphic T-Shirt", "Pocket T-Shirt"], "shirt neck pocket",
         ["machine wash", "short sleeve", "cotton spandex", "classic fit", "moisture wicking"],
         {"color": ["black", "white", "heather gray", "navy"], "size": SIZES}, (8, 35)),
        ("jeans", f"{FASH} › Women › Clothing › Jeans",
         ["Skinny Jeans", "High Waist Jeans", "Bootcut Jeans"], "jeans waist",
         ["stretch fabric", "machine wash", "button closure", "slim fit", "high waist"],
         {"color": ["light blue", "indigo", "black"], "size": ["26", "28", "30", "32"]}, (20, 70)),
        ("winter jacket", f"{FASH} › Women › Clothing › Coats, Jackets & Vests › Down Jackets & Parkas",
         ["Puffer Jacket", "Winter Jacket", "Hooded Winter Jacket"], "jacket winter",
         ["water resistant", "warm and cozy", "detachable hood", "zipper closure", "machine wash"],
         {"color": ["black", "olive green", "burgundy", "camel"], "size": SIZES}, (40, 180)),
        ("dress", f"{FASH} › Women › Clothing › Dresses › Casual",
         ["Summer Dress", "Maxi Dress", "Wrap Dress"], "dress summer",
         ["floral print", "short sleeve", "v neck", "machine wash", "loose fit"],
         {"color": ["floral blue", "black", "dusty pink", "white"], "size": SIZES[:3]}, (18, 60)),
        ("backpack", f"{FASH} › Luggage & Travel Gear › Backpacks › Casual Daypacks",
         ["Laptop Backpack", "Travel Backpack", "Hiking Backpack"], "backpack laptop travel",
         ["water resistant", "large capacity", "padded straps", "usb charging port", "anti theft"],
         {"color": ["black", "gray", "navy", "green"]}, (20, 80)),
    ],
    "food": [
        ("protein bars", f"{FOOD} › Snacks & Sweets › Snack Foods › Bars › Protein Bars",
         ["Protein Bars", "Protein Snack Bars", "Keto Protein Bars"], "protein bars snack",
         ["gluten free", "low sugar", "high protein", "non gmo", "keto friendly"],
         {"flavor": ["chocolate peanut butter", "cookie dough", "salted caramel", "birthday cake"],
          "size": ["12 count", "30 count"]}, (15, 45)),
        ("coffee beans", f"{FOOD} › Beverages › Coffee, Tea & Cocoa › Coffee › Whole Coffee Beans",
         ["Whole Bean Coffee", "Coffee Beans", "Espresso Coffee Beans"], "bean coffee beans espresso",
         ["medium roast", "dark roast", "fair trade", "single origin", "usda organic"],
         {"size": ["12 ounce", "2 pound", "3 kilogram"]}, (9, 60)),
        ("green tea", f"{FOOD} › Beverages › Coffee, Tea & Cocoa › Tea › Green",
         ["Green Tea Bags", "Matcha Green Tea", "Loose Leaf Green Tea"], "tea bags matcha leaf",
         ["usda organic", "non gmo", "individually wrapped", "natural ingredients", "gluten free"],
         {"flavor": ["jasmine", "mint", "lemon ginger", "original"], "size": ["16 count", "40 count", "100 count"]}, (5, 25)),
        ("trail mix", f"{FOOD} › Snacks & Sweets › Snack Foods › Trail Mix",
         ["Trail Mix", "Nut Trail Mix", "Snack Mix"], "trail mix nut snack",
         ["gluten free", "resealable bag", "non gmo", "high protein", "no added sugar"],
         {"flavor": ["classic", "tropical", "dark chocolate", "honey roasted"], "size": ["8 ounce", "26 ounce"]}, (6, 30)),
        ("olive oil", f"{FOOD} › Pantry Staples › Cooking & Baking › Oils, Vinegars & Salad Dressings › Oils › Olive",
         ["Extra Virgin Olive Oil", "Olive Oil", "Cold Pressed Olive Oil"], "olive oil",
         ["cold pressed", "usda organic", "non gmo", "single origin", "glass bottle"],
         {"size": ["500 ml", "1 liter", "1 gallon"]}, (8, 55)),
        ("dark chocolate", f"{FOOD} › Snacks & Sweets › Candy & Chocolate › Chocolate Bars",
         ["Dark Chocolate Bar", "Dark Chocolate Squares", "Chocolate Bar"], "chocolate bar squares",
         ["fair trade", "low sugar", "dairy free", "usda organic", "individually wrapped"],
         {"flavor": ["sea salt", "almond", "orange", "mint"], "size": ["3 pack", "12 pack"]}, (5, 40)),
    ],
    "furniture": [
        ("office chair", f"{FURN} › Home Office Furniture › Home Office Chairs › Desk Chairs",
         ["Office Chair", "Ergonomic Desk Chair", "Mesh Office Chair"], "office chair desk mesh",
         ["lumbar support", "height adjustable", "easy assemble", "breathable mesh", "heavy duty"],
         {"color": ["black", "gray", "white"]}, (60, 300)),
        ("bookshelf", f"{FURN} › Living Room Furniture › Bookcases",
         ["Bookshelf", "Ladder Bookshelf", "Storage Bookshelf"], "bookshelf ladder storage",
         ["easy assemble", "space saving", "solid wood", "storage space", "living room"],
         {"color": ["walnut", "white", "black oak", "gray"], "size": ["3 tier", "5 tier"]}, (40, 200)),
        ("coffee table", f"{FURN} › Living Room Furniture › Tables › Coffee Tables",
         ["Coffee Table", "Lift Top Coffee Table", "Round Coffee Table"], "coffee table top",
         ["living room", "storage space", "easy assemble", "solid wood", "mid century"],
         {"color": ["rustic brown", "white", "black", "natural"]}, (50, 250)),
        ("bed frame", f"{FURN} › Bedroom Furniture › Beds, Frames & Bases › Bed Frames",
         ["Platform Bed Frame", "Metal Bed Frame", "Upholstered Bed Frame"], "platform bed frame metal",
         ["heavy duty", "noise free", "easy assemble", "under bed storage", "no box spring needed"],
         {"color": ["black", "white", "gray"], "size": ["twin", "full", "queen", "king"]}, (90, 400)),
        ("bar stools", f"{FURN} › Game & Recreation Room Furniture › Home Bar Furniture › Barstools",
         ["Bar Stools", "Counter Height Bar Stools", "Swivel Bar Stools"], "bar stools counter height",
         ["height adjustable", "set of two", "easy assemble", "faux leather", "footrest"],
         {"color": ["black", "brown", "white", "gray"]}, (50, 220)),
        ("nightstand", f"{FURN} › Bedroom Furniture › Nightstands",
         ["Nightstand", "Bedside Nightstand", "Nightstand with Drawers"], "nightstand drawers",
         ["charging station", "space saving", "easy assemble", "solid wood", "storage space"],
         {"color": ["white", "walnut", "black", "gray"]}, (30, 150)),
    ],
}
BRANDS = {
    "beauty": ["Lumina", "Verella", "Rosalie", "Glowra", "Amberly", "Purelle", "Maisonne", "Cherisa"],
    "electronics": ["Voltix", "Sonaro", "Kinetra", "Zentec", "Orbix", "Pulsewave", "Nexora", "Aerotek"],
    "fashion": ["Northpeak", "Urbanly", "Calder", "Mavrik", "Solstice", "Driftwood", "Ravello", "Kestrel"],
    "food": ["Harvestly", "Goldleaf", "Terraverde", "Nutrisa", "Orchardia", "Bramble", "Saltmarsh", "Mapleton"],
    "furniture": ["Oakhaven", "Linwood", "Nordvik", "Hearthly", "Casamora", "Elmstead", "Brookline", "Tidewell"],
}
ADJECTIVES = ["Premium", "Classic", "Essential", "Modern", "Everyday", "Deluxe", "Original", "Signature"]
FILLER = ["A thoughtful choice for everyday use.", "Backed by our friendly customer service.",
          "Makes a great gift for family and friends.", "Designed with care by our team."]
REVIEWS = ["Works as described.", "Good value for the money.", "Arrived quickly and well packed.",
           "Not bad, but expected a bit more.", "Would buy again."]
# Proper nouns (brands) and the head nouns of every type: the words title_nouns keeps.
NOUNS = frozenset(w.lower() for c in BRANDS.values() for w in c) | frozenset(
    w for types in TYPES.values() for t in types for w in t[3].split())
# normalize_color: WebShop maps every option value to the first colour of its alphabetical
# COLOR_SET (web_agent_site/engine/normalize.py) that occurs in it; the same 102 words here.
COLOR_SET = sorted("""
    alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown burgundy
    camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee cognac copper coral
    cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold granite grape graphite grass
    gray green grey heather indigo ivory ivy khaki lavender lemon leopard light lilac lime magenta maroon
    mauve merlot midnight mint mocha multicolor mushroom mustard natural navy nude olive orange peach pewter
    pink plum purple rainbow red rose royal rust sand sapphire seashell silver skull slate steel stone
    stonewash sunflower tan taupe teal tiger turquoise violet walnut wheat white wine yellow""".split())
PRICE_RANGE = [10.0 * i for i in range(1, 100)]   # WebShop's price_upper grid
SEARCH_RETURN_N, PRODUCT_WINDOW = 50, 10           # WebShop: top 50 results, 10 per page
STOPWORDS = frozenset("a an and are as at be by for from i in is it looking me need of on or that the to want "
                      "which with find buy am".split())


@dataclass
class Product:
    """One catalogue item; field meanings as in WebShop's product records."""
    asin: str                      # item id, lower-case (what click[...] takes)
    title: str
    category: str                  # beauty | electronics | fashion | food | furniture
    query: str                     # the product type (WebShop: the search query it was scraped with)
    product_category: str          # breadcrumb "A › B › C"
    attributes: list[str]
    options: dict[str, list[str]]  # option name -> values
    price: float
    description: str = ""
    features: list[str] = field(default_factory=list)    # WebShop's BulletPoints
    reviews: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Goal:
    """One instruction; fields as WebShop's goal dicts (``name`` = the target product's title)."""
    asin: str
    category: str
    query: str
    name: str
    product_category: str
    instruction: str
    attributes: list[str]
    goal_options: dict[str, str]
    price_upper: float


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def generate_catalogue(seed: int, num_products: int) -> list[Product]:
    """Products spread round-robin over the 30 types, so every type has ~num_products/30
    near-duplicates (same type, other attributes/prices): the agent must read and compare."""
    rng = random.Random(f"catalogue-{seed}")
    kinds = [(cat, t) for cat, types in TYPES.items() for t in types]
    products, asins = [], set()
    for i in range(num_products):
        cat, (query, crumbs, heads, _nouns, attr_pool, options, (lo, hi)) = kinds[i % len(kinds)]
        asin = "b0" + "".join(rng.choices("0123456789abcdefghijklmnopqrstuvwxyz", k=8))
        while asin in asins:
            asin = "b0" + "".join(rng.choices("0123456789abcdefghijklmnopqrstuvwxyz", k=8))
        asins.add(asin)
        brand, head = rng.choice(BRANDS[cat]), rng.choice(heads)
        attrs = sorted(rng.sample(attr_pool, rng.randint(2, 3)))
        # our choice: a third of titles carry one of their attributes, as real listings often do
        # ("Long Lasting Matte Lipstick"), so the title alone can satisfy an attribute.
        flair = attrs[0].title() if rng.random() < 0.33 else rng.choice(ADJECTIVES)
        title = f"{brand} {flair} {head}"
        # our choice: each item offers a random part of its type's option values, and prices are
        # log-uniform over a wide range, so the first search hit often lacks the asked colour or
        # breaks the budget: the agent has to compare prices and check options, as in WebShop.
        opts = {name: sorted(rng.sample(vals, rng.randint(min(2, len(vals)), len(vals))))
                for name, vals in options.items()}
        # our choice: the description names one attribute and the features list all of them;
        # WebShop's index sees title, description, the first feature and the options only, so a
        # search cannot see every attribute and the agent has to open Features to check.
        desc = f"This {head.lower()} by {brand} is {rng.choice(attrs)}. {rng.choice(FILLER)}"
        feats = [rng.choice(FILLER)] + [f"{a.upper()}: one of the reasons customers choose this {query}." for a in attrs]
        reviews = [(rng.randint(3, 5), rng.choice(REVIEWS)) for _ in range(rng.randint(1, 3))]
        price = round(int(lo * (2 * hi / lo) ** rng.random()) + 0.99, 2)
        products.append(Product(asin, title, cat, query, crumbs, attrs, opts, price, desc, feats, reviews))
    return products


def generate_goals(products: list[Product], n: int, seed: int) -> list[Goal]:
    """n goals with distinct instruction texts. The price bound follows WebShop's get_goals:
    of the first four multiples of 10 above the target's price, sample two, keep the larger."""
    rng = random.Random(f"goals-{seed}")
    heads = ["i am looking for {a} {q}", "i need {q} that is {a}", "find me {a} {q}", "i want {q}, {a}"]
    goals, seen = [], set()
    while len(goals) < n:
        p = rng.choice(products)
        attrs = sorted(rng.sample(p.attributes, rng.randint(1, 2)))
        opts = {k: rng.choice(v) for k, v in sorted(p.options.items())}
        grid = [x for x in PRICE_RANGE if x > p.price][:4]
        price_upper = max(rng.sample(grid, 2)) if len(grid) >= 2 else 1e6   # WebShop: no bound past $980
        text = rng.choice(heads).format(a=" and ".join(attrs), q=p.query)
        if opts:   # WebShop synthetic goals: " with name: value, and name: value"
            text += " with " + ", and ".join(f"{k}: {v}" for k, v in opts.items())
        text += f", and price lower than {price_upper:.2f} dollars" if price_upper < 1e6 else ""
        if text not in seen:
            seen.add(text)
            goals.append(Goal(p.asin, p.category, p.query, p.title, p.product_category, text, attrs, opts, price_upper))
    return goals


# ---------------------------------------------------------------------------------------
# ALGO LOGIC: WebShop's reward (web_agent_site/engine/goal.py::get_reward, read for facts).
# ---------------------------------------------------------------------------------------
def token_set_ratio(a: str, b: str) -> int:
    """thefuzz's ``fuzz.token_set_ratio`` (0-100) as WebShop runs it: split both strings into
    token sets, and return the best similarity among (common, common+rest_a), (common,
    common+rest_b), (common+rest_a, common+rest_b); one token set inside the other scores 100.
    The similarity is difflib's ratio, rounded: WebShop pins thefuzz 0.19 and does not install
    python-Levenshtein, and that thefuzz then falls back to difflib. Our choice: tokens are runs
    of ASCII letters and digits (thefuzz: word characters after dropping bytes 128-255), the
    same on every text our catalogue makes."""
    ta, tb = set(_tokens(a)), set(_tokens(b))
    common = " ".join(sorted(ta & tb))
    ca = f"{common} {' '.join(sorted(ta - tb))}".strip()
    cb = f"{common} {' '.join(sorted(tb - ta))}".strip()
    pairs = [(ca, cb)] + ([(common, ca), (common, cb)] if common else [])
    return max(round(100 * SequenceMatcher(None, x, y).ratio()) if x and y else 0 for x, y in pairs)


def title_nouns(title: str) -> list[str]:
    """Nouns and proper nouns of a title, in order. WebShop tags them with spaCy
    en_core_web_lg (not available offline); our choice: the titles come from our own word
    lists, so a word is a noun iff it is a brand or a head noun of a product type (NOUNS)."""
    return [w for w in _tokens(title) if w in NOUNS]


def type_reward(product: Product, goal: Goal) -> float:
    """r_type (WebShop get_type_reward). query_match: same type query; category_match: the
    breadcrumbs share >= 2 levels; title_score = |nouns(bought) ∩ nouns(goal)| / |nouns(goal)|
    (0.2 if the goal title has none). r_type = 1, or 0.5 if none of query_match,
    category_match, title_score > 0.2 holds; then 0.1 if title_score < 0.1; 0 if title_score == 0."""
    query_match = product.query == goal.query
    crumbs = lambda s: {x.strip() for x in s.split("›")}
    category_match = len(crumbs(product.product_category) & crumbs(goal.product_category)) >= 2
    want, got = title_nouns(goal.name), title_nouns(product.title)
    title_score = len(set(want) & set(got)) / len(want) if want else 0.2   # WebShop: list length below
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type


def attribute_matches(product: Product, goal: Goal) -> int:
    """n_att (WebShop get_attribute_reward): goal attributes found, each counted once: fuzzy
    match (token_set_ratio > 85) to one of the product's attributes, or else the phrase occurs
    as a substring of its title, features or description (lower-cased)."""
    texts = [t.lower() for t in (product.title, " ".join(product.features), product.description)]
    return sum(any(token_set_ratio(p, g) > 85 for p in product.attributes) or any(g in t for t in texts)
               for g in goal.attributes)


def normalize_color(value: str) -> str:
    """WebShop's normalize_color: the first colour of COLOR_SET occurring in the value, else the value."""
    return next((c for c in COLOR_SET if c in value), value)


def option_matches(goal: Goal, chosen: dict[str, str]) -> int:
    """n_opt (WebShop get_option_reward): goal options met by a chosen option value, each goal
    option counted once. Both sides go through normalize_color, then match fuzzily
    (token_set_ratio > 85), size as every other option; the product's text plays no part (that
    fallback is for attributes). Option names play no part either: our goals keep them for the
    instruction text ("with color: x"), but the match is on values, as for WebShop's human goals
    (the ones its baseline and GiGPO train and test on), whose options are a list of values."""
    picked = [normalize_color(v) for v in chosen.values()]
    return sum(any(token_set_ratio(p, normalize_color(g)) > 85 for p in picked)
               for g in goal.goal_options.values())


def webshop_reward(product: Product, goal: Goal, price: float, chosen: dict[str, str]) -> tuple[float, dict]:
    """WebShop reward (Yao et al. 2022, Sec. 3.1; goal.py get_reward):
        r = r_type · (n_att + n_opt + 1[price <= u]) / (|U_att| + |U_opt| + 1)
    with n_att / n_opt the goal attributes / goal options met (each at most once, so r <= 1),
    U_att / U_opt those the goal asks for, u the price bound. Success = (r == 1)."""
    n_att, n_opt = attribute_matches(product, goal), option_matches(goal, chosen)
    r_price = float(price <= goal.price_upper)
    r_type = type_reward(product, goal)
    r = r_type * (n_att + n_opt + r_price) / (len(goal.attributes) + len(goal.goal_options) + 1)
    return r, dict(r_type=r_type, n_att=n_att, n_opt=n_opt, r_price=r_price)


def summarize(rewards: list[float]) -> dict[str, float]:
    """WebShop's two metrics: score = 100 × mean reward, success rate = fraction with reward 1."""
    n = max(1, len(rewards))
    return dict(score=100.0 * sum(rewards) / n, success_rate=sum(r == 1.0 for r in rewards) / n)


# ---------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: search engine, pages and actions.
# ---------------------------------------------------------------------------------------
class SearchEngine:
    """BM25 (rank_bm25.BM25Okapi) over the text WebShop indexes per product: title,
    description, first feature and "name: values" of the options. Returns the top 50 items
    with a positive score, ties in catalogue order. Results are cached per query, since the
    rollouts of a group repeat the same searches."""

    def __init__(self, products: list[Product]):
        self.asins = [p.asin for p in products]
        docs = [" ".join([p.title, p.description, p.features[0] if p.features else "",
                          ", and ".join(f"{k}: {', '.join(vs)}" for k, vs in p.options.items())]) for p in products]
        self.bm25 = BM25Okapi([self._terms(d) for d in docs])
        self.cache: dict[tuple[str, ...], list[str]] = {}

    @staticmethod
    def _terms(text: str) -> list[str]:
        return [t for t in _tokens(text) if t not in STOPWORDS]

    def search(self, query: str) -> list[str]:
        terms = tuple(self._terms(query))
        if terms not in self.cache:
            scores = self.bm25.get_scores(list(terms)) if terms else np.zeros(len(self.asins))
            order = np.argsort(-scores, kind="stable")[:SEARCH_RETURN_N]
            self.cache[terms] = [self.asins[i] for i in order if scores[i] > 0]
        return self.cache[terms]


SEARCH_TEMPLATE = "search[<your query>]"   # shown as admissible where the page has a search bar
SUBPAGES = ("description", "features", "reviews")


def split_action(action: str) -> tuple[str, str]:
    """'search[x]' / 'click[x]' -> (kind, argument), lower-cased, spaces collapsed; ('', '') if malformed."""
    m = re.fullmatch(r"(search|click)\[(.+)\]", collapse(action).lower())
    return (m.group(1), m.group(2).strip()) if m else ("", "")


def is_admissible(action: str, admissible: list[str]) -> bool:
    """For the manager: an action is admissible if listed, or if it is a non-empty
    search[...] and the page offers SEARCH_TEMPLATE (any query may be typed). Our choice: the
    template copied as is ("search[<your query>]") is not a query, so it is not admissible."""
    kind, arg = split_action(action)
    if kind == "search":
        return bool(arg) and arg != "<your query>" and SEARCH_TEMPLATE in admissible
    return bool(kind) and f"click[{arg}]" in admissible


@dataclass
class _Session:
    """Browser state of one episode."""
    goal: Goal
    page: str = "search"            # search | results | item | description | features | reviews | done
    query: str = ""
    results: list[str] = field(default_factory=list)
    page_num: int = 1
    asin: str | None = None
    chosen: dict[str, str] = field(default_factory=dict)   # option name -> clicked value
    score: float = 0.0              # WebShop reward of the purchase (0 until bought)


@functools.lru_cache(maxsize=4)
def _build_shop(seed: int, num_products: int, num_goals: int) -> tuple[list[Product], list[Goal], SearchEngine]:
    """Our choice: backends with the same settings share one catalogue, goal list and index
    (read-only after building), so a manager with many env slots builds the shop once."""
    products = generate_catalogue(seed, num_products)
    return products, generate_goals(products, num_goals, seed), SearchEngine(products)


# ---------------------------------------------------------------------------------------
# The prompt and the action grammar (both backends)
# ---------------------------------------------------------------------------------------
# Our own wording. "{skill}", "{history}" and "{search_hint}" are blocks that are either empty or
# end in "\n"; the history block and the answer line are the ones ALFWorld's prompt uses (core.py).
# The skill block comes before the request, as in ALFWorld's prompt (envs.PROMPT says why).
PROMPT = (
    "You are a shopping assistant in an online store. You move between its pages one command "
    "at a time; buying an item ends the episode.\n"
    "{skill}"
    "The customer asks: {task}\n"
    "{history}"
    "Page you are on (parts separated by [SEP]): {obs}\n"
    "Commands you can use on this page, one per line:\n{actions}\n"
    "{search_hint}"
    "{answer}"
)
SKILL_BLOCK = "Shopping advice that worked for requests like this before:\n{skill}\n"
SEARCH_HINT = "In search[<your query>], put your own search words in place of <your query>.\n"


class WebShop:
    """What both WebShop backends share: the prompt template and the action grammar."""

    @staticmethod
    def build_prompt(cfg, state: EnvState, history: list[tuple[str, str | None]], skill: str | None = None) -> str:
        """The user message for one step: `skill` (one block, or none at all), the customer's request,
        the last cfg.history_len steps, the page, its commands one per line, and the answer format."""
        return PROMPT.format(
            task=state.task, skill=SKILL_BLOCK.format(skill=skill.strip()) if skill else "",
            history=history_block(history, cfg.history_len), obs=collapse(state.obs),
            actions="\n".join(state.admissible),
            search_hint=SEARCH_HINT if any(a.startswith("search[") for a in state.admissible) else "",
            answer=ANSWER)

    @staticmethod
    def parse_action(text: str, admissible: list[str]) -> tuple[str | None, bool]:
        """(action, valid) from a model response, never raising: the answer rule of
        `core.extract_action`, then `is_admissible`: a listed click[...], or any non-empty search[...]
        where the page offers the "search[<your query>]" template (our choice: the literal
        placeholder is not a query). Returned as "kind[argument]", lower-cased."""
        action = extract_action(text)
        if action is None or not is_admissible(action, admissible):
            return None, False
        kind, arg = split_action(action)
        return f"{kind}[{arg}]", True


# ---------------------------------------------------------------------------------------
# The embedded shop
# ---------------------------------------------------------------------------------------
class EmbeddedWebShop(WebShop):
    """One browser of the embedded shop for envs.EnvManager (one instance per env slot)."""

    def __init__(self, cfg, products: list[Product] | None = None, goals: list[Goal] | None = None):
        """cfg: an envs.EnvConfig; its seed and webshop section are read.
        products/goals: hand-made shop for tests (goals[:num_eval_goals] = eval, rest = train)."""
        self.cfg = cfg.webshop
        if products is None:
            products, goals, self.engine = _build_shop(cfg.seed, self.cfg.num_products,
                                                       self.cfg.num_eval_goals + self.cfg.num_train_goals)
        else:
            self.engine = SearchEngine(products)
        self.products, self.goals = products, goals
        self.by_asin = {p.asin: p for p in self.products}
        self.session: _Session | None = None

    # --- task bookkeeping ---------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        """Eval = goals 0..num_eval_goals-1 (fixed, as WebShop's test split), train = the rest."""
        n_eval = min(self.cfg.num_eval_goals, len(self.goals))
        idx = range(n_eval) if split == "eval" else range(n_eval, len(self.goals))
        return [f"webshop:{i}" for i in idx]

    def _goal(self, task_id: str) -> Goal:
        return self.goals[int(task_id.split(":")[1])]

    def task_type(self, task_id: str) -> str:
        return self._goal(task_id).category

    # --- browser ------------------------------------------------------------------------
    def _render(self) -> tuple[str, list[str]]:
        """Page text in WebShop's simple text mode ('[SEP]' between elements) and its actions.
        Our choice: the instruction is left out of the page (the prompt shows it once) and
        the item page starts with 'You have clicked <option>.' (WebShop's rich text mode),
        so the chosen options are visible and distinguish the anchor states."""
        s = self.session
        if s.page == "search":
            return "WebShop [SEP] Search", [SEARCH_TEMPLATE]
        if s.page == "results":
            shown = s.results[(s.page_num - 1) * PRODUCT_WINDOW: s.page_num * PRODUCT_WINDOW]
            more = s.page_num * PRODUCT_WINDOW < len(s.results)
            nav = (["< Prev"] if s.page_num > 1 else []) + (["Next >"] if more else [])
            parts = ["Back to Search", f"Page {s.page_num} (Total results: {len(s.results)})", *nav]
            for a in shown:
                parts += [a, self.by_asin[a].title, f"${self.by_asin[a].price:.2f}"]
            return " [SEP] ".join(parts), [f"click[{x.lower()}]" for x in ["Back to Search", *nav, *shown]]
        p = self.by_asin[s.asin]
        if s.page == "item":
            parts = [f"You have clicked {v}." for v in s.chosen.values()] + ["Back to Search", "< Prev"]
            for name, values in p.options.items():
                parts += [name, *values]
            rating = sum(r for r, _ in p.reviews) / max(1, len(p.reviews))
            parts += [p.title, f"Price: ${p.price:.2f}", f"Rating: {rating:.1f}",
                      "Description", "Features", "Reviews", "Buy Now"]
            acts = ["back to search", "< prev", *(v for vs in p.options.values() for v in vs), *SUBPAGES, "buy now"]
            return " [SEP] ".join(parts), [f"click[{a}]" for a in acts]
        if s.page in SUBPAGES:
            body = {"description": [p.description], "features": p.features,
                    "reviews": [f"{r} stars: {t}" for r, t in p.reviews]}[s.page]
            return " [SEP] ".join(["Back to Search", "< Prev", *body]), ["click[back to search]", "click[< prev]"]
        return self._done_text, []

    def _info(self, admissible: list[str], invalid: bool = False, **extra) -> dict:
        s = self.session
        return dict(admissible=admissible, won=s.score == 1.0, task=s.goal.instruction, task_type=s.goal.category,
                    score=s.score, invalid=invalid, **extra)

    def reset(self, task_id: str) -> tuple[str, dict]:
        self.session = _Session(self._goal(task_id))
        obs, adm = self._render()
        return obs, self._info(adm)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """One browser action. Buying ends the episode: info["score"] = webshop_reward (kept
        after the episode ends), reward = 10 x won with won = (score == 1); every other step
        has reward 0 and score 0. An inadmissible action leaves the page unchanged and sets
        info["invalid"] = True (never raises)."""
        s = self.session
        obs, adm = self._render()
        if not is_admissible(action, adm):
            return obs, 0.0, s.page == "done", self._info(adm, invalid=True)
        kind, arg = split_action(action)
        reward, extra = 0.0, {}
        if kind == "search":
            s.page, s.query, s.results, s.page_num = "results", arg, self.engine.search(arg), 1
        elif arg == "back to search":
            s.page, s.asin, s.chosen = "search", None, {}
        elif arg == "next >":
            s.page_num += 1
        elif arg == "< prev":   # results: previous page; item: back to results; sub-page: back to item
            if s.page == "results":
                s.page_num -= 1
            elif s.page == "item":
                s.page, s.asin, s.chosen = "results", None, {}
            else:
                s.page = "item"
        elif arg in SUBPAGES and s.page == "item":
            s.page = arg
        elif arg == "buy now":
            p = self.by_asin[s.asin]
            s.score, parts = webshop_reward(p, s.goal, p.price, s.chosen)
            reward = WIN_REWARD if s.score == 1.0 else 0.0
            extra = dict(reward_info=parts, purchased=p.asin, chosen=dict(s.chosen))
            s.page = "done"
            self._done_text = (f"Thank you for shopping with us! [SEP] Purchased [SEP] {p.asin} [SEP] {p.title} "
                               f"[SEP] Your score (min 0.0, max 1.0) [SEP] {s.score:.4f}")
        elif s.page == "results":
            s.page, s.asin, s.chosen = "item", arg, {}
        else:   # an option value on the item page
            p = self.by_asin[s.asin]
            s.chosen[next(k for k, vs in p.options.items() if arg in vs)] = arg
        obs, adm = self._render()
        return obs, reward, s.page == "done", self._info(adm, **extra)

    # --- expert -------------------------------------------------------------------------
    def walkthrough(self, task_id: str) -> list[str]:
        """Expert actions that earn reward 1: search the instruction without its price clause,
        page to the first result that can score 1 (choosing the goal's option values), click
        its options, buy. Falls back to searching the target's title (always in the top 50).
        (Real WebShop has none: `RealWebShop.walkthrough`.)"""
        g = self._goal(task_id)
        for query in (g.instruction.split(", and price lower than")[0], g.name.lower()):
            for rank, asin in enumerate(self.engine.search(query)):
                p = self.by_asin[asin]
                chosen = {k: (g.goal_options[k] if g.goal_options.get(k) in vs else vs[0])
                          for k, vs in p.options.items()}
                if webshop_reward(p, g, p.price, chosen)[0] == 1.0:
                    return ([f"search[{query}]"] + ["click[next >]"] * (rank // PRODUCT_WINDOW) + [f"click[{asin}]"]
                            + [f"click[{v}]" for v in chosen.values()] + ["click[buy now]"])
        raise RuntimeError(f"no winning product found for {task_id}")


# ---------------------------------------------------------------------------------------
# Real WebShop (princeton-nlp/WebShop checkout), same backend API.
# ---------------------------------------------------------------------------------------
INSTALL_HINT = ("env.source=real needs a local princeton-nlp/WebShop checkout with its packages, product data "
                "and search index, installed as README.md says (Environments: real WebShop; not its setup.sh, "
                "which pins torch 1.11 and transformers 4.19), and env.webshop.path set to it")
REAL_VAL_END = 1500   # WebShop's baseline (baseline_models/env.py): test goals 0-499, val 500-1499, train 1500+
DEBUG_SEARCHES = ("<r>", "<a>", "<c>", "<q>")   # first words that switch WebShop's search to a listing mode

_SLOTS = itertools.count()


@contextlib.contextmanager
def _own_random(seed: int | None = None):
    """Leaves Python's global random state as it was around a call into WebShop, which seeds it
    (SimServer: random.seed(233)) and draws from it (prices, price bounds, session names).
    seed: where WebShop's draws start inside the block (None: from the state as it is)."""
    state = random.getstate()
    if seed is not None:
        random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@functools.lru_cache(maxsize=2)
def _real_server(path: str, num_products: int | None, seed: int):
    """Load WebShop's SimServer once per (checkout, product subset, seed): products, search
    index and human goals, in WebShop's goal order (shuffled with its own seed 233).
    Our choice: WebShop draws product prices (inside a price range) and each goal's price bound
    from the global random state before it reseeds, so those draws start from env.seed: the goal
    list is then fixed by (checkout, num_products, seed), and our own random state is untouched."""
    if path not in sys.path:
        sys.path.insert(0, path)
    with _own_random(seed):
        from web_agent_site.envs.web_agent_text_env import WebAgentTextEnv
        return WebAgentTextEnv(observation_mode="text", num_products=num_products, human_goals=True).server


def _plain_query(query: str) -> str:
    """Our choice: a query is searched as words. Brackets go (WebShop would misread
    ``search[a [b]]``), and a first word among DEBUG_SEARCHES loses its angle brackets, because
    WebShop reads those as its developers' listing modes (random items, by attribute, ...)."""
    words = query.replace("[", " ").replace("]", " ").split()
    if words and words[0] in DEBUG_SEARCHES:
        words[0] = words[0].strip("<>")
    return " ".join(words)


class RealWebShop(WebShop):
    """Drives ``web_agent_site.envs.WebAgentTextEnv`` in-process (its SimServer, no Flask), in
    WebShop's "text" observation mode. Goal i is WebShop's goal i; splits as WebShop's baseline:
    eval = goals[:num_eval_goals] (its test split is 0-499), train = goals from 1500 on (its val
    split, 500-1499, is left out). What the policy sees differs from the raw text mode in two
    ways: the "Instruction: [SEP] <text>" block is cut (the prompt shows the task once), and the
    item page starts with "You have clicked <value>." per chosen option, as the embedded shop's
    and WebShop's own "text_rich" mode do, because the text mode renders that page the same
    before and after an option click (the policy could not see its choice, and GiGPO would take
    the two pages for one anchor state). No expert: walkthrough() is empty."""

    def __init__(self, cfg):
        """cfg: an envs.EnvConfig; its seed and webshop section are read (`WebShopConfig.check_real`
        checked the index size and the eval split when the config was made)."""
        seed, cfg = cfg.seed, cfg.webshop
        path = cfg.path
        if not path or not os.path.isdir(os.path.join(path, "web_agent_site")):
            raise WebShopNotInstalled(f"{INSTALL_HINT} (env.webshop.path={path!r} has no web_agent_site/)")
        try:
            server = _real_server(os.path.abspath(path), cfg.num_products or None, seed)
            from web_agent_site.envs.web_agent_text_env import WebAgentTextEnv
        except Exception as e:   # missing packages, data or index
            raise WebShopNotInstalled(f"{INSTALL_HINT} (loading it failed: {e!r})") from e
        if cfg.num_train_goals and len(server.goals) <= REAL_VAL_END:
            raise WebShopNotInstalled(f"real WebShop loaded {len(server.goals)} goals, but its train split starts at "
                                      f"goal {REAL_VAL_END}: load more products (env.webshop.num_products=0 with its "
                                      "full product data) or set env.webshop.num_train_goals=0 to evaluate only")
        # one server (products, index, goals) for all slots; a session prefix per slot, because
        # WebShop keys its browser state by session id and group rollouts share a goal index
        with _own_random():   # the constructor resets to a random session name
            self.env = WebAgentTextEnv(observation_mode="text", server=server, session_prefix=f"slot{next(_SLOTS)}-")
        self.cfg, self.goals = cfg, server.goals
        self.goal: dict = {}
        self.last, self.admissible, self.score, self.done = "", [], 0.0, False

    def task_ids(self, split: str) -> list[str]:
        n = len(self.goals)
        idx = (range(min(self.cfg.num_eval_goals, n)) if split == "eval"
               else range(REAL_VAL_END, min(n, REAL_VAL_END + self.cfg.num_train_goals)))
        return [f"webshop:{i}" for i in idx]

    def task_type(self, task_id: str) -> str:
        return self.goals[int(task_id.split(":")[1])]["category"]

    def walkthrough(self, task_id: str) -> list[str]:
        """[]: WebShop has human demonstrations, not a plan per goal (so no cold start here), as
        ALFWorld's backend returns [] when its planner finds none."""
        return []

    def _observe(self, obs: str) -> str:
        """WebShop's text page -> what the policy sees (see the class docstring); updates the admissible actions."""
        avail = self.env.get_available_actions()
        self.admissible = [SEARCH_TEMPLATE] * avail["has_search_bar"] + [
            f"click[{c}]" for c in avail["clickables"] if c != "search"]
        parts = obs.split(" [SEP] ")
        if "Instruction:" in parts:   # the label, then the instruction
            i = parts.index("Instruction:")
            del parts[i:i + 2]
        if self.env.server.get_page_name(self.env.browser.current_url) == "item_page":
            chosen = self.env.server.user_sessions[self.env.session]["options"]
            parts = [f"You have clicked {v}." for v in chosen.values()] + parts
        self.last = " [SEP] ".join(parts)
        return self.last

    def _info(self, invalid=False) -> dict:
        return dict(admissible=list(self.admissible), won=self.score == 1.0, task=self.goal["instruction_text"].strip(),
                    task_type=self.goal["category"], score=self.score, invalid=invalid)

    def reset(self, task_id: str) -> tuple[str, dict]:
        i = int(task_id.split(":")[1])
        with _own_random():
            obs, _ = self.env.reset(session=i)
        self.goal, self.score, self.done = self.goals[i], 0.0, False
        return self._observe(obs), self._info()

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """As EmbeddedWebShop.step: WebShop's reward (paid when buying) -> info["score"], reward 10 x won."""
        kind, arg = split_action(action)
        arg = _plain_query(arg) if kind == "search" else arg
        if not is_admissible(action, self.admissible) or not arg:
            return self.last, 0.0, self.done, self._info(invalid=True)
        with _own_random():
            obs, reward, done, _ = self.env.step(f"{kind}[{arg}]")
        if done:
            self.score, self.done = float(reward), True
        return self._observe(obs), WIN_REWARD if self.score == 1.0 else 0.0, self.done, self._info()


# ---------------------------------------------------------------------------------------
# Scripted buyer and bench.
# ---------------------------------------------------------------------------------------
def scripted_buyer(backend: EmbeddedWebShop, task_id: str) -> float:
    """A naive baseline (embedded shop): search the whole instruction, open the first result,
    click every option value the instruction names that the item offers, buy. Returns WebShop's
    reward of the purchase (info["score"])."""
    _, info = backend.reset(task_id)
    _, _, _, info = backend.step(f"search[{info['task']}]")
    items = [a for a in info["admissible"] if a not in ("click[back to search]", "click[next >]", "click[< prev]")]
    if not items:
        return 0.0
    _, _, _, info = backend.step(items[0])
    for value in backend.session.goal.goal_options.values():
        if f"click[{value}]" in info["admissible"]:
            backend.step(f"click[{value}]")
    return backend.step("click[buy now]")[3]["score"]


def bench(cfg) -> None:
    """`python webshop.py bench`: catalogue, step and search latency, a scripted buyer, the expert.
    cfg: an envs.EnvConfig with name=webshop."""
    seed = cfg.seed
    t0 = time.perf_counter()
    ws = EmbeddedWebShop(cfg)
    t_build = time.perf_counter() - t0
    eval_ids = ws.task_ids("eval")
    print(f"catalogue: {len(ws.products)} products, {len(ws.goals)} goals "
          f"({len(eval_ids)} eval / {len(ws.task_ids('train'))} train), built in {t_build:.2f} s")
    rng, n_steps, t0 = random.Random(seed), 0, time.perf_counter()
    for tid in eval_ids[:100]:             # random walks: mixed search / click / page steps
        _, info = ws.reset(tid)
        for _ in range(15):
            act = rng.choice(info["admissible"]) if info["admissible"] else "click[buy now]"
            act = act.replace("<your query>", info["task"]) if act == SEARCH_TEMPLATE else act
            _, _, done, info = ws.step(act)
            n_steps += 1
            if done:
                break
    print(f"step latency: {1000 * (time.perf_counter() - t0) / n_steps:.2f} ms/step over {n_steps} steps")
    queries, t0 = [g.instruction for g in ws.goals[-200:]], time.perf_counter()
    for q in queries:                     # goals not used above: BM25 search without the cache
        ws.engine.search(q)
    print(f"search latency (uncached BM25 over {len(ws.products)} items): "
          f"{1000 * (time.perf_counter() - t0) / len(queries):.2f} ms/query")
    t0 = time.perf_counter()
    m = summarize([scripted_buyer(ws, tid) for tid in eval_ids])
    print(f"scripted buyer on {len(eval_ids)} eval goals: score {m['score']:.1f}, success rate "
          f"{m['success_rate']:.3f} ({time.perf_counter() - t0:.1f} s)")
    rewards, lengths = [], []
    for tid in eval_ids:
        ws.reset(tid)
        acts = ws.walkthrough(tid)
        rewards.append([ws.step(a)[3]["score"] for a in acts][-1])
        lengths.append(len(acts))
    m = summarize(rewards)
    print(f"walkthrough (expert): score {m['score']:.1f}, success rate {m['success_rate']:.3f}, "
          f"mean length {sum(lengths) / len(lengths):.1f}, max {max(lengths)}")


def upstream_goal_module(path: str):
    """WebShop's own ``web_agent_site.engine.goal`` from the checkout at `path` (for ``agree`` and
    the tests). Importing it loads spaCy's en_core_web_sm, which only its type reward uses;
    where that model is missing, a blank English pipeline stands in while it imports."""
    import spacy  # WebShop's dependency, not ours
    if path not in sys.path:
        sys.path.insert(0, path)
    spacy_load = spacy.load

    def load(name, *args, **kwargs):
        try:
            return spacy_load(name, *args, **kwargs)
        except OSError:
            return spacy.blank("en")
    spacy.load = load
    try:
        return importlib.import_module("web_agent_site.engine.goal")
    finally:
        spacy.load = spacy_load


def agree(cfg, path: str) -> None:
    """Our reward against WebShop's own rules (goal.py get_attribute_reward and get_option_reward,
    run from the checkout at `path`) on 5,000 purchases: the 500 eval goals x the top 5 search
    results for the instruction x 2 option choices (the goal's value where the item offers it,
    else its first; the first value of every option). Both sides take our type reward (WebShop
    tags nouns with spaCy, see title_nouns) and the price rule, so only n_att and n_opt can differ."""
    up = upstream_goal_module(path)
    ws = EmbeddedWebShop(cfg)
    n = differ = flips = 0
    for tid in ws.task_ids("eval"):
        g = ws._goal(tid)
        for asin in ws.engine.search(g.instruction)[:5]:
            p = ws.by_asin[asin]
            wanted = {k: g.goal_options[k] if g.goal_options.get(k) in vs else vs[0] for k, vs in p.options.items()}
            for chosen in (wanted, {k: vs[0] for k, vs in p.options.items()}):
                ours = webshop_reward(p, g, p.price, chosen)[0]
                item = dict(Attributes=p.attributes, Title=p.title, BulletPoints=p.features, Description=p.description)
                _, n_att = up.get_attribute_reward(item, dict(attributes=g.attributes))
                _, n_opt = up.get_option_reward(list(chosen.values()), list(g.goal_options.values()))
                theirs = (type_reward(p, g) * (n_att + n_opt + (p.price <= g.price_upper))
                          / (len(g.attributes) + len(g.goal_options) + 1))
                n, differ, flips = n + 1, differ + (abs(ours - theirs) > 1e-9), flips + ((ours == 1) != (theirs == 1))
    print(f"{n} purchases: {differ} rewards differ from WebShop's rules, {flips} flip success")


if __name__ == "__main__":
    from envs import EnvConfig  # envs imports this module; as a script it is imported once more, as "webshop"

    if sys.argv[1:2] == ["bench"]:
        bench(EnvConfig(name="webshop"))
    elif sys.argv[1:2] == ["agree"] and len(sys.argv) == 3:
        agree(EnvConfig(name="webshop"), sys.argv[2])
    else:
        print("usage: python webshop.py bench | python webshop.py agree PATH_TO_WEBSHOP_CHECKOUT")
