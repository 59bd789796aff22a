"""The invented world: deterministic, consistent, and shaped for multiple-choice questions."""

from __future__ import annotations

import pytest

from smallthinker.synthetic.world import CATEGORIES, KIND_CATEGORY, build_world, kind_counts


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = build_world(0), build_world(0), build_world(1)
    assert a.facts == b.facts and [e.name for e in a.entities] == [e.name for e in b.entities]
    assert a.facts != c.facts


@pytest.mark.parametrize("num_entities", [24, 64, 101])
def test_entity_counts_and_attribute_counts(num_entities):
    world = build_world(3, num_entities)
    assert len(world.entities) == num_entities
    assert sum(kind_counts(num_entities).values()) == num_entities
    for entity in world.entities:
        assert 4 <= len(entity.attributes) <= 6
        assert len(world.facts_about(entity.name)) == len(entity.attributes)
    assert 4 <= len(world.categories) <= 6 and set(world.categories) <= set(CATEGORIES)


def test_names_are_unique_and_never_a_value():
    world = build_world(0)
    names = [e.name.lower() for e in world.entities]
    values = {v.lower() for r in world.relations.values() for v in r.values}
    assert len(set(names)) == len(names)
    assert not set(names) & values


def test_facts_match_attributes_and_links_are_consistent():
    world = build_world(0)
    for fact in world.facts:
        entity = world.by_name[fact.subject]
        relation = world.relations[fact.relation]
        assert entity.attributes[fact.relation] == fact.object
        assert fact.category == KIND_CATEGORY[entity.kind]
        assert fact.object in world.candidates(relation)
        assert len(world.candidates(relation)) >= 4  # three distractors always exist
        if relation.target_kind is not None:
            assert world.by_name[fact.object].kind == relation.target_kind
    for country in world.of_kind("country"):
        capital = world.by_name[country.attributes["capital"]]
        assert capital.attributes["country"] == country.name


def test_too_small_world_is_refused():
    with pytest.raises(ValueError, match="at least 24"):
        build_world(0, 10)
