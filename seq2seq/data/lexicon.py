"""The synthetic task's lexicon: English and German words with what the grammar needs of them.

Nouns carry gender and plural; verbs carry their English forms, German finite forms by person,
participle, separable prefix and perfect auxiliary; the tables below give articles and endings
by case, and the closed word classes (pronouns, modals, prepositions, conjunctions, times).
``seq2seq.data.synthetic`` writes sentences from them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    de: str
    de_pl: str
    gender: str  # "m", "f" or "n"
    animate: bool


@dataclass(frozen=True)
class Verb:
    en: str  # base form; may be two words ("pick up")
    en_3sg: str
    en_past: str
    de_1sg: str  # finite forms without the separable prefix
    de_3sg: str
    de_pl: str
    de_part: str  # participle, prefix included
    prefix: str  # separable prefix ("an" in "ruft ... an"), or ""
    aux: str  # perfect auxiliary: "haben" or "sein"

    @property
    def de_inf(self) -> str:
        return self.prefix + self.de_pl


def _nouns(table: str, animate: bool) -> list[Noun]:
    nouns = []
    for line in table.strip().splitlines():
        en, en_pl, de, de_pl, gender = line.split()
        nouns.append(Noun(en, en_pl, de, de_pl, gender, animate))
    return nouns


ANIMATE = _nouns("""
dog dogs Hund Hunde m
cat cats Katze Katzen f
bird birds Vogel Vögel m
horse horses Pferd Pferde n
mouse mice Maus Mäuse f
man men Mann Männer m
woman women Frau Frauen f
child children Kind Kinder n
girl girls Mädchen Mädchen n
teacher teachers Lehrer Lehrer m
doctor doctors Arzt Ärzte m
friend friends Freund Freunde m
king kings König Könige m
queen queens Königin Königinnen f
baker bakers Bäcker Bäcker m
""", animate=True)

THINGS = _nouns("""
book books Buch Bücher n
car cars Auto Autos n
apple apples Apfel Äpfel m
ball balls Ball Bälle m
house houses Haus Häuser n
letter letters Brief Briefe m
table tables Tisch Tische m
chair chairs Stuhl Stühle m
door doors Tür Türen f
window windows Fenster Fenster n
cup cups Tasse Tassen f
bottle bottles Flasche Flaschen f
flower flowers Blume Blumen f
tree trees Baum Bäume m
cake cakes Kuchen Kuchen m
""", animate=False)

NOUNS = ANIMATE + THINGS

ADJECTIVES = {
    "big": "groß", "small": "klein", "old": "alt", "young": "jung", "red": "rot",
    "black": "schwarz", "white": "weiß", "green": "grün", "happy": "glücklich",
    "tired": "müde", "fast": "schnell", "new": "neu", "beautiful": "schön", "strange": "seltsam",
}


def _verbs(table: str) -> list[Verb]:
    """Parse ``base/3sg/past = [prefix+]infinitive/1sg/3sg/participle[/sein]`` lines."""
    verbs = []
    for line in table.strip().splitlines():
        en, de = (side.strip() for side in line.split("="))
        en_base, en_3sg, en_past = en.split("/")
        inf, de_1sg, de_3sg, part, *aux = de.split("/")
        prefix, _, de_pl = inf.rpartition("+")
        verbs.append(Verb(en_base, en_3sg, en_past, de_1sg, de_3sg, de_pl, part, prefix,
                          aux[0] if aux else "haben"))
    return verbs


TRANSITIVE = _verbs("""
see/sees/saw = sehen/sehe/sieht/gesehen
love/loves/loved = lieben/liebe/liebt/geliebt
find/finds/found = finden/finde/findet/gefunden
buy/buys/bought = kaufen/kaufe/kauft/gekauft
carry/carries/carried = tragen/trage/trägt/getragen
wash/washes/washed = waschen/wasche/wäscht/gewaschen
paint/paints/painted = malen/male/malt/gemalt
visit/visits/visited = besuchen/besuche/besucht/besucht
need/needs/needed = brauchen/brauche/braucht/gebraucht
hear/hears/heard = hören/höre/hört/gehört
sell/sells/sold = verkaufen/verkaufe/verkauft/verkauft
catch/catches/caught = fangen/fange/fängt/gefangen
bring/brings/brought = bringen/bringe/bringt/gebracht
look for/looks for/looked for = suchen/suche/sucht/gesucht
call/calls/called = an+rufen/rufe/ruft/angerufen
pick up/picks up/picked up = auf+heben/hebe/hebt/aufgehoben
invite/invites/invited = ein+laden/lade/lädt/eingeladen
take along/takes along/took along = mit+nehmen/nehme/nimmt/mitgenommen
""")

INTRANSITIVE = _verbs("""
sleep/sleeps/slept = schlafen/schlafe/schläft/geschlafen
laugh/laughs/laughed = lachen/lache/lacht/gelacht
wait/waits/waited = warten/warte/wartet/gewartet
sing/sings/sang = singen/singe/singt/gesungen
dance/dances/danced = tanzen/tanze/tanzt/getanzt
work/works/worked = arbeiten/arbeite/arbeitet/gearbeitet
play/plays/played = spielen/spiele/spielt/gespielt
run/runs/ran = laufen/laufe/läuft/gelaufen/sein
swim/swims/swam = schwimmen/schwimme/schwimmt/geschwommen/sein
come/comes/came = kommen/komme/kommt/gekommen/sein
come back/comes back/came back = zurück+kommen/komme/kommt/zurückgekommen/sein
get up/gets up/got up = auf+stehen/stehe/steht/aufgestanden/sein
""")

# Person of a subject: "1sg", "3sg", "1pl" or "3pl". German finite forms by person.
AUX = {"haben": {"1sg": "habe", "3sg": "hat", "pl": "haben"},
       "sein": {"1sg": "bin", "3sg": "ist", "pl": "sind"}}
# English modal -> (affirmative, negative) by 3sg / other, and the German finite forms.
MODALS = {
    "can": ({"3sg": "can", "other": "can"}, {"3sg": "cannot", "other": "cannot"},
            {"1sg": "kann", "3sg": "kann", "pl": "können"}),
    "must": ({"3sg": "must", "other": "must"}, {"3sg": "must not", "other": "must not"},
             {"1sg": "muss", "3sg": "muss", "pl": "müssen"}),
    "will": ({"3sg": "will", "other": "will"}, {"3sg": "will not", "other": "will not"},
             {"1sg": "werde", "3sg": "wird", "pl": "werden"}),
    "want": ({"3sg": "wants to", "other": "want to"},
             {"3sg": "does not want to", "other": "do not want to"},
             {"1sg": "will", "3sg": "will", "pl": "wollen"}),
}

# (English, German nominative, accusative, dative, person)
PRONOUNS = [
    ("I", "ich", "mich", "mir", "1sg"), ("he", "er", "ihn", "ihm", "3sg"),
    ("she", "sie", "sie", "ihr", "3sg"), ("we", "wir", "uns", "uns", "1pl"),
    ("they", "sie", "sie", "ihnen", "3pl"),
]
# English particles that a pronoun object precedes ("pick it up"); "look for" is a preposition.
PARTICLES = {"up", "along"}
OBJECT_PRONOUNS = {"I": "me", "he": "him", "she": "her", "we": "us", "they": "them"}

DEFINITE = {  # case -> gender or "pl" -> article
    "nom": {"m": "der", "f": "die", "n": "das", "pl": "die"},
    "acc": {"m": "den", "f": "die", "n": "das", "pl": "die"},
    "dat": {"m": "dem", "f": "der", "n": "dem", "pl": "den"},
}
# Endings of ein-words (ein, mein, dein, unser) by case and gender or "pl".
EIN_ENDING = {
    "nom": {"m": "", "f": "e", "n": "", "pl": "e"},
    "acc": {"m": "en", "f": "e", "n": "", "pl": "e"},
    "dat": {"m": "em", "f": "er", "n": "em", "pl": "en"},
}
POSSESSIVES = {"my": "mein", "your": "dein", "our": "unser"}
NUMBERS = {"two": "zwei", "three": "drei", "four": "vier", "five": "fünf", "six": "sechs",
           "seven": "sieben", "eight": "acht", "nine": "neun", "ten": "zehn"}
PREPOSITIONS = [("with", "mit", "dat"), ("near", "bei", "dat"), ("for", "für", "acc"),
                ("without", "ohne", "acc")]
CONJUNCTIONS = {"because": "weil", "although": "obwohl", "if": "wenn", "while": "während",
                "before": "bevor", "after": "nachdem"}
REPORTING = [  # verbs that take a that-clause: English 3sg/other/past, German 1sg/3sg/pl/part
    (("says", "say", "said"), ("sage", "sagt", "sagen", "gesagt")),
    (("thinks", "think", "thought"), ("denke", "denkt", "denken", "gedacht")),
    (("knows", "know", "knew"), ("weiß", "weiß", "wissen", "gewusst")),
]
DAYS = {"Monday": "Montag", "Tuesday": "Dienstag", "Wednesday": "Mittwoch",
        "Thursday": "Donnerstag", "Friday": "Freitag", "Saturday": "Samstag",
        "Sunday": "Sonntag"}
MONTHS = {"January": "Januar", "February": "Februar", "March": "März", "April": "April",
          "May": "Mai", "June": "Juni", "July": "Juli", "August": "August",
          "September": "September", "October": "Oktober", "November": "November",
          "December": "Dezember"}
ADVERBS = {"today": "heute", "tomorrow": "morgen", "yesterday": "gestern",
           "every day": "jeden Tag", "in the evening": "am Abend"}
