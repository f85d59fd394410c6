"""User events made by the SDK's own UserEventFactory over the fixture datafiles."""

import random

from optimizely import entities
from optimizely.event import user_event
from optimizely.event.user_event_factory import UserEventFactory


def impressions(config, user_prefix, rng, count):
    """Impressions of every experiment and rollout rule and each of their variations."""
    rules = []
    for exp in config.experiment_id_map.values():
        flag = next(
            (f.key for f in config.feature_key_map.values() if exp.id in f.experimentIds), "flag-x"
        )
        rule_type = "rollout" if exp.layerId == exp.id or "rollout" in str(exp.layerId) else "feature-test"
        for var in exp.variations:
            rules.append((exp, var["id"], flag, exp.key, rule_type, bool(var.get("featureEnabled", True))))
    assert rules, "datafile has no rules"
    out = []
    for i in range(count):
        exp, var_id, flag, rule_key, rule_type, enabled = rules[i % len(rules)]
        attrs = rng.choice(ATTRIBUTE_SETS)
        cmab = f"cmab-{i}" if i % 7 == 0 else None
        e = UserEventFactory.create_impression_event(
            config, exp, var_id, flag, rule_key, rule_type, enabled, f"{user_prefix}-{i}", attrs, cmab
        )
        assert e is not None
        out.append(e)
    return out


def conversions(config, user_prefix, rng, count, calls):
    tag_shapes = [c.get("tags") for c in calls if c["kind"] == "conversion"]
    attribute_shapes = [dict(c.get("attributes") or []) for c in calls] + ATTRIBUTE_SETS
    keys = [e.key for e in config.event_key_map.values()]
    out = []
    for i in range(count):
        e = UserEventFactory.create_conversion_event(
            config, keys[i % len(keys)], f"{user_prefix}-{i}", rng.choice(attribute_shapes),
            tag_shapes[i % len(tag_shapes)],
        )
        assert e is not None
        out.append(e)
    return out


def holdout_impressions(config, user_prefix, count):
    """Holdout impressions as the SDK 5.7 makes them: a Holdout entity and a VariationDict."""
    holdout = entities.Holdout(
        id="9400000000001", key="global_holdout", status="Running",
        variations=[{"id": "9400000000002", "key": "off", "featureEnabled": False}],
        trafficAllocation=[], audienceIds=[],
    )
    out = []
    for i in range(count):
        variation = {"id": "9400000000002", "key": "off", "featureEnabled": False}
        ctx = user_event.EventContext(
            config.account_id, config.project_id, config.revision, config.anonymize_ip, config.region
        )
        attrs = UserEventFactory_attributes(config, {"country": "DE"})
        out.append(
            user_event.ImpressionEvent(
                ctx, f"{user_prefix}-{i}", holdout, attrs, variation, "checkout_redesign",
                "global_holdout", "holdout", False, config.get_bot_filtering_value(),
                cmab_uuid=None if i % 2 else f"cmab-h-{i}",
            )
        )
    return out


def UserEventFactory_attributes(config, attributes):
    from optimizely.event.event_factory import EventFactory

    return EventFactory.build_attribute_list(attributes, config)


ATTRIBUTE_SETS = [
    {"country": "DE", "plan": "free", "age": 34},
    {},
    None,
    {"country": "FR", "age": 12.5},
    {"plan": True, "unknown": "dropped"},
    {"age": 2 ** 53, "country": "日本"},
]


def mixed(configs, calls, n, seed=7):
    """About n events over the main and rev132 datafiles, in runs of each, shuffled within."""
    rng = random.Random(seed)
    out = []
    per = max(1, n // 6)
    for label in ("main", "rev132", "main"):
        config = configs[label]
        run = impressions(config, f"{label}-i", rng, per) + conversions(config, f"{label}-c", rng, per, calls)
        if label == "main":
            run += holdout_impressions(config, "holdout", max(1, per // 10))
        rng.shuffle(run)
        out += run
    return out
