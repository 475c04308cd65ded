"""Query text for the query-personalization task: a product's type words, derived from its description.

The evaluation needs the words a customer would type when looking for a *kind* of product,
without the words that single out the one they bought (colour, material, size, pattern,
theme). The rule is fixed and deterministic so every run asks the same questions:

1. upper-case the description and split it into words (letters, digits, ``'`` and ``-``
   stay inside a word, so ``T-LIGHT`` is one word); words with a digit (``60CM``, ``SET/4``
   pieces) are dropped;
2. the *head* is the last word of the first run of words that name a product type
   (`TYPE_NOUNS`, plurals included): "WHITE HANGING HEART T-LIGHT HOLDER" → ``HOLDER``;
   "SMALL RED RETROSPOT MUG IN BOX" → ``MUG``; "JUMBO BAG CHARLIE AND LOLA TOYS" → ``BAG``.
   Words that are more often a motif than the product (`WEAK_TYPE_NOUNS`: HEART, BALL…)
   start a run only when the description has no other type word;
3. the word right before the head is kept as well when it is itself a type word or a known
   type modifier (`TYPE_MODIFIERS`: LUNCH, PHOTO, DOOR…): ``T-LIGHT HOLDER``, ``BAG CHARM``,
   ``LUNCH BAG``; a design word before it is not: "SET OF 4 PISTACHIO LOVEBIRD COASTER" →
   ``COASTER``;
4. without a type word, the last one or two words that are not in `STOP_WORDS` (colours,
   materials, sizes, adjectives, patterns, themes, function words) are used;
5. nothing left → no query (that product gives no case).
"""

from __future__ import annotations

import re

_SPLIT = re.compile(r"[^A-Z0-9'\-]+")

TYPE_NOUNS = frozenset(
 """
 ALBUM APRON ASHTRAY BACKPACK BAG BALLOON BANGLE BANK BASKET BAUBLE BEAKER BELL BIN BIRDHOUSE
 BLACKBOARD BLOCK BOARD BOOK BOOKEND BOTTLE BOUQUET BOWL BOX BRACELET BROOCH BRUSH BUCKET BUNTING
 BURNER CABINET CADDY CAKESTAND CALCULATOR CALENDAR CANDLE CANDLEHOLDER CANDLEPOT CANDLESTICK CANISTER
 CARD CASE CHAIR CHALKBOARD CHANDELIER CHARM CHEST CHOPSTICKS CLIP CLOCK COASTER COLANDER COMB
 CONTAINER CRACKER CRATE CUP CURTAIN CUSHION CUTLERY CUTTER DECORATION DISH DISPENSER DOILY DOLL
 DOMINOES DOORMAT DOORSTOP DRAWER DRAWERS EARRINGS ENVELOPE ERASER FAN FEEDER FLAG FLANNEL FRAME GAME
 GARLAND GLOVE GNOME HAIRCLIP HAIRSLIDE HAMMOCK HANDBAG HANGER HOLDER HOOK HOTTIE JAR JIGSAW
 JOURNAL JUG KEYRING KIT KNOB LAMP LAMPSHADE LANTERN LIGHTS MAGNET MAT MEASURE MIRROR MOBILE
 MOULD MUG NAPKIN NECKLACE NIGHTLIGHT NOTEBOOK ORGANISER ORNAMENT PAD PAN PARASOL PEG PEN PENCIL PENDANT
 PICTURE PLACEMAT PLANTER PLAQUE PLATE PLATTER POT POUCH PURSE PUZZLE RACK RIBBON RING RULER SACK SAUCER
 SCALES SCISSORS SHARPENER SHELF SIGN SKETCHBOOK SKITTLES SOAP SPONGE SPOON STAMP STAND
 STICKER STOCKING STOOL STRAW T-LIGHT TAG TAPE TEAPOT TEASPOON THERMOMETER THROW TIDY TILE TISSUE
 TOWEL TOY TRAY TRUG TUMBLER UMBRELLA VASE WALLET WARMER WASHBAG WATERING WREATH WRAP
 """.split()
)

WEAK_TYPE_NOUNS = frozenset("BALL COSY HEART LETTER LIGHT SLATE STAR TIN".split())

TYPE_MODIFIERS = frozenset(
    """
    ALARM BAKING BATH BIRD BREAD BUTTER CAKE CHOPPING COAT COFFEE COOKIE DINNER DOOR DRAWER EGG FRIDGE GIFT
    HAIR HAND HOT JAM JUMBO KEY LUGGAGE LUNCH MEMO MILK MONEY NIGHT NOTE PAPER PASSPORT PHOTO PICNIC PILLAR
    PLANT RECIPE SALAD SHOPPING SNACK SOAP STORAGE SUGAR TABLE TEA TEATIME TOILET TRINKET WALL WASH WATER
    WINE WRITING
    """.split()
)

STOP_WORDS = frozenset(
    """
    A AN AND AS ASS ASSORTED ASST ASSTD AT BY FOR FROM IN OF ON OR THE TO W WITH YOUR MY OWN I YOU
    SET PACK PAIR PIECE PIECES S L M XL
    BLACK BLUE BROWN CREAM GOLD GREEN GREY IVORY LILAC MULTICOLOUR NATURAL ORANGE PASTEL PINK PURPLE RED
    SILVER TURQUOISE WHITE YELLOW FUSCHIA AMBER COLOUR COLOURED COLOURS CLEAR JET
    ACRYLIC BAKELIKE BRASS CERAMIC CHROME COPPER COTTON CRYSTAL DIAMANTE ENAMEL FABRIC FELT GLASS GLITTER
    IRON LACE LEATHER METAL PAPIER PLASTIC PORCELAIN RATTAN RUBBER SHELL SLATE STEEL STONE TIN WICKER WIRE
    WOOD WOODEN ZINC POLYESTER PEARL BEADED BEAD
    BIG GIANT JUMBO LARGE LONG MEDIUM MINI MINIATURE SMALL TALL TINY ROUND SQUARE OVAL
    ANTIQUE CLASSIC DECORATIVE FANCY FUNKY HANGING HAPPY LOVE NEW RETRO RUSTIC SCENTED SWEET TRADITIONAL
    VINTAGE EDWARDIAN VICTORIAN REGENCY FRENCH ENGLISH SCANDINAVIAN FOLKART CHILDRENS CHILDS KIDS BABY
    DESIGN DESIGNS STYLE PRINT PATTERN POLKADOT RETROSPOT SPOT SPOTS SPOTTY STRIPE STRIPES STRIPED
    GINGHAM PAISLEY FLORAL FLOCK FLOWER FLOWERS ROSE ROSES DAISY SPACEBOY DOLLY GIRL BOY SKULL SKULLS
    CHRISTMAS EASTER BIRTHDAY PARTY UNION JACK LONDON PARIS HOME HEARTS STAR STARS
    """.split()
)


def _words(description: str) -> list[str]:
    words = [w.strip("'-") for w in _SPLIT.split(description.upper())]
    return [w for w in words if w and not any(ch.isdigit() for ch in w)]


def _is_type(word: str, nouns: frozenset[str] = TYPE_NOUNS | WEAK_TYPE_NOUNS) -> bool:
    if word in nouns:
        return True
    return any(word.endswith(suffix) and word[: -len(suffix)] in nouns for suffix in ("ES", "S"))


def _is_strong_type(word: str) -> bool:
    return _is_type(word, TYPE_NOUNS)


def type_query(description: str | None) -> str | None:
    """The product-type words of a description ("COPPER AND BRASS BAG CHARM" → "BAG CHARM"), or None."""
    words = _words(description or "")
    start = next((i for i, w in enumerate(words) if _is_strong_type(w)), None)
    if start is None:
        start = next((i for i, w in enumerate(words) if _is_type(w)), None)
    if start is None:
        content = [w for w in words if w not in STOP_WORDS and len(w) > 1]
        return " ".join(content[-2:]) or None
    head = start
    while head + 1 < len(words) and _is_type(words[head + 1]):
        head += 1
    before = words[head - 1] if head else None
    if before and (_is_type(before) or before in TYPE_MODIFIERS):
        return f"{before} {words[head]}"
    return words[head]
