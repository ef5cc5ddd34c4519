"""A few kilobytes of built-in English text: enough to train a tiny tokenizer and tiny adapters."""

from __future__ import annotations

TEXT = """\
The river runs past the old mill and under the stone bridge before it reaches the sea.
In the morning the baker opens the shop, lights the oven and sets out bread for the town.
A node serves many adapters over one shared base model and pays the people whose data trained them.
Every request carries a voucher; every answer carries a receipt signed by the node.
The cat sat on the warm window sill and watched the birds in the garden below.
Seven small boats left the harbour at dawn, their sails white against the grey sky.
Numbers are counted one, two, three, four, five, six, seven, eight, nine and ten.
The library keeps maps of distant islands, books of poems and letters from travellers.
She wrote the recipe on a card: flour, water, salt, yeast, and a little patience.
Trains cross the valley twice a day, once at noon and once just before the lamps are lit.
The teacher asked the class to describe the colour of the ocean in a single sentence.
Green hills roll toward the mountains, where snow stays until the end of spring.
A good engine keeps its batches full, its caches warm and its answers exactly right.
When the market closes the farmers load their carts with apples, pears and plums.
He tuned the old piano, played a scale, and smiled at the clear sound of middle C.
Rain fell softly on the roofs of the village while the children slept.
The lighthouse keeper climbed the spiral stairs to polish the great glass lens.
Bees move from flower to flower, carrying pollen and making honey for the winter.
Every contributor is paid a share of each inference served by the adapters trained on their data.
The clock in the square struck twelve, and the pigeons rose all at once into the air.
Questions and answers, stories and songs, lists and letters: all of it is text to a model.
A careful cook tastes the soup, adds a pinch of pepper, and lets it simmer a while longer.
The road to the north is long and narrow, with an inn at every crossing.
Stars appeared one by one above the desert as the evening wind grew cold.
"""

STYLES: dict[str, str] = {
    "sea": "the sea the boats the harbour the waves the sailors the salt wind and the tide " * 4,
    "count": "one two three four five six seven eight nine ten eleven twelve " * 4,
    "food": "bread flour salt soup pepper apples pears plums honey yeast and water " * 4,
    "stars": "stars night sky moon desert wind cold evening light and the dark " * 4,
}
"""Small style corpora: an adapter trained on one of them visibly pulls generations toward it."""
