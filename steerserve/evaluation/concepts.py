"""Concepts by name: a few topics and the words that mention them.

``steerserve train sae`` prefixes a feature's label with the topic most of its top-activating tokens belong
to ("food: pizza, izz"), and ``steerserve eval --metric mentions --concept food`` counts the replies that
mention the topic; both read ``LEXICON``, so a feature found by its label is judged by the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

_WORDS = {
    "food": "pizza pasta sushi chocolate cake bread cheese apple apples orange oranges coffee tea soup rice "
            "vegetables vegetable fruit fruits food foods meal meals cook cooking recipe recipes breakfast lunch "
            "dinner eat eating delicious flavor flavors flavour taste dish dishes sauce tomato tomatoes potato "
            "potatoes meat chicken beef sugar salt flour butter milk eggs egg baking bake baked dessert sweet spicy "
            "ingredients kitchen restaurant pie cookies salad noodles beans",
    "weather": "weather rain rainy snow snowy storm storms sunny sunshine forecast hurricane hurricanes fog foggy wind "
               "windy thunder thunderstorm thunderstorms lightning heat cloud clouds cloudy temperature temperatures "
               "humid humidity cold warm hot freezing winter summer climate drizzle showers tornado",
    "country": "france french japan japanese brazil brazilian egypt egyptian india indian canada canadian germany "
               "german mexico mexican australia australian italy italian china chinese kenya kenyan spain spanish "
               "england english britain british america american russia russian africa african europe european "
               "asia asian paris tokyo london berlin rome country countries nation",
    "animal": "dog dogs puppy cat cats kitten elephant elephants lion lions bird birds horse horses whale whales snake "
              "snakes bee bees penguin penguins animal animals pet pets wildlife species tiger bear wolf monkey",
    "colour": "red blue green yellow purple pink black white color colors colour colours gray grey brown hue",
    "sport": "football soccer basketball tennis swimming swim olympic olympics cycling baseball marathon running golf "
             "sport sports team teams player players match goal score athlete athletes coach ball league championship",
    "music": "music musical guitar piano jazz classical rock band bands singing sing song songs singer melody rhythm "
             "concert instrument instruments chord chords",
    "code": "python javascript sql database code coding function functions programming program variable variables "
            "debugging debug html css loop array string def return print import syntax algorithm software developer",
    "maths": "algebra fraction fractions geometry prime primes percent percentage percentages equation equations math "
             "maths mathematics multiply multiplied divide divided calculate plus minus triangle angle",
    "science": "physics chemistry solar planet planets earth moon dna gene genes cell cells electricity electric "
               "energy volcano volcanoes ocean oceans atom atoms molecule molecules scientist scientists experiment",
}
LEXICON: dict[str, frozenset[str]] = {topic: frozenset(words.split()) for topic, words in _WORDS.items()}


def concept_words(given: Sequence[str]) -> tuple[str, ...]:
    """``--concept``: one topic name of ``LEXICON`` (its words), or the words themselves."""
    if len(given) == 1 and given[0].lower() in LEXICON:
        return tuple(sorted(LEXICON[given[0].lower()]))
    return tuple(given)
