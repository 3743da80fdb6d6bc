"""The word list for room codes: 256 short, common, easy-to-say English words.

Chosen by hand: lowercase letters only, 3 to 6 letters, no homophone pairs, nothing
offensive. Two words give 16 bits of secret; the PAKE makes that enough because an
attacker gets one online guess per connection (and the host slows repeat offenders).
Changing this list changes which codes are valid, so treat it as part of the protocol.
"""

from __future__ import annotations

WORDS: tuple[str, ...] = tuple(
    """
    acorn actor adobe agent alarm album alpha amber anchor angel apple apron arrow
    atlas autumn badge badger bagel baker bamboo banjo barn basil basin beach beacon
    beaver berry bison blade bloom bonus boot bottle breeze brick bridge brook brush
    bucket butter cabin cactus camel candle canoe canyon carbon cargo carpet castle
    cedar cello chalk cherry chess chili cider circle citrus clay cliff clock cloud
    clover cobalt cocoa comet copper coral cotton cousin coyote crane crater crayon
    crown cube daisy delta denim desert diesel dingo donkey dragon drum eagle easel
    echo elbow ember engine fable falcon fern fiddle finch flame flute forest fossil
    fox frost galaxy garden garlic gecko ginger globe goose grape gravel guitar
    hammer harbor hazel hedge helmet heron honey hornet husky igloo indigo island
    ivory jacket jaguar jelly jigsaw jungle kayak kettle kiwi koala ladder lagoon
    lake laser lemon lilac lime linen lizard llama locket lotus lunar magnet mango
    maple marble meadow melon meteor mint mirror mitten mocha monkey moon moose
    mosaic muffin nectar needle nickel noodle nutmeg oasis ocean olive onion opal
    orbit orchid otter oyster paddle panda papaya parrot pebble pepper piano pickle
    pigeon pillow pilot pine planet plum pocket polar pony poppy potato prism puffin
    quartz quill rabbit radar radish raven ribbon river robin rocket rover ruby
    saddle sail salmon sandal satin scarf seal shadow silver sketch sloth smoke
    snail sonnet spider spruce squid stone storm sugar summit sunset swan tango
    teapot tiger timber tomato topaz torch tulip tundra turtle velvet violet walnut
    walrus willow window winter wolf yogurt zebra zephyr
    """.split()
)

if len(WORDS) != 256 or len(set(WORDS)) != 256:  # pragma: no cover - guards edits of the list
    raise RuntimeError(f"the room-code word list must hold 256 distinct words, has {len(set(WORDS))}")
