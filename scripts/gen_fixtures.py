#!/usr/bin/env python3
"""Record conformance fixtures from the official Optimizely Python SDK (optimizely-sdk 5.7.0).

Usage (from anywhere; paths are relative to this file):

    /tmp/pyv/bin/python scripts/gen_fixtures.py      # or .venv/bin/python after scripts/setup-python.sh

Writes tests/fixtures/python-sdk-5.7.0/:

- datafile-rev132.json, datafile-eu-nobot.json: modified copies of the shared datafile
  (../shared/fixtures/python-sdk-5.7.0/datafile.json beside the repository). rev132: revision
  "132", botFiltering false, anonymizeIP false, and `search_ranking_mvt` moved into a mutual
  exclusion group. eu-nobot: region "EU" and no botFiltering.
- one NAME.json per case below, of the form

      {"sdk_call": "<the Python call that produced it>",
       "datafile": "<path relative to the repository root>",
       "call": {"kind": "impression", "user_id", "attributes", "flag_key", "rule_key",
                "variation_key", "enabled"}
             | {"kind": "conversion", "user_id", "attributes", "event_key", "tags"},
       "log_event": {"url", "http_verb", "headers", "params"}}

  `attributes` is a list of [key, value] pairs in the order the SDK was given them (the SDK
  keeps that order in the payload, and a JSON object would not say it). Values JSON cannot
  hold (NaN, infinities) appear as {"$python": "<repr>"}. `tags` is the dict given to
  `track` (null for none). For impressions, rule_key/variation_key/enabled are read from the
  OptimizelyDecision that `decide` returned, not from the payload.

The SDK runs with a ForwardingEventProcessor and a recording dispatcher, so each call yields
exactly one LogEvent synchronously. Bucketing is deterministic (MurmurHash of the user id), so
reruns produce the same files except for each event's `uuid` and `timestamp`. The script fails
if a case does not produce exactly one event or a decision is not the one the case expects.
"""

import copy
import json
import math
import sys
from pathlib import Path

from optimizely import optimizely
from optimizely.decision.optimizely_decide_option import OptimizelyDecideOption
from optimizely.event.event_processor import ForwardingEventProcessor
from optimizely.version import __version__ as SDK_VERSION

REPO = Path(__file__).resolve().parent.parent
SHARED_DATAFILE = "../shared/fixtures/python-sdk-5.7.0/datafile.json"
OUT_DIR = "tests/fixtures/python-sdk-5.7.0"

if SDK_VERSION != "5.7.0":
    sys.exit(f"optimizely-sdk 5.7.0 required, found {SDK_VERSION}")


class Recorder:
    """An event dispatcher that keeps what it is asked to send."""

    def __init__(self):
        self.events = []

    def dispatch_event(self, log_event):
        self.events.append({
            "url": log_event.url,
            "http_verb": log_event.http_verb,
            "headers": log_event.headers,
            "params": log_event.params,
        })


def encode_value(v):
    """JSON for a call input; values JSON cannot hold become {"$python": repr}."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return {"$python": repr(v)}
    return v


def encode_attributes(attrs):
    return [[k, encode_value(v)] for k, v in attrs.items()]


def load(rel):
    return (REPO / rel).read_text(encoding="utf-8")


def write_json(rel, obj):
    path = REPO / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: fail rather than write NaN, which is not JSON.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                    encoding="utf-8")


def client_for(datafile_rel):
    rec = Recorder()
    client = optimizely.Optimizely(
        datafile=load(datafile_rel),
        event_dispatcher=rec,
        event_processor=ForwardingEventProcessor(rec),
    )
    if not client.is_valid:
        sys.exit(f"SDK rejected {datafile_rel}")
    return client, rec


def find_user(datafile_rel, prefix, attrs, flag, rule, variation):
    """The first `prefix-N` the SDK buckets into `rule`/`variation` of `flag`, without events."""
    client, rec = client_for(datafile_rel)
    for i in range(10000):
        uid = f"{prefix}-{i}"
        d = client.create_user_context(uid, attrs).decide(
            flag, [OptimizelyDecideOption.DISABLE_DECISION_EVENT])
        if d.rule_key == rule and d.variation_key == variation:
            assert not rec.events
            return uid
    sys.exit(f"no user of {prefix} lands in {flag}/{rule}/{variation}")


def only_event(rec, name):
    if len(rec.events) != 1:
        sys.exit(f"{name}: expected one LogEvent, got {len(rec.events)}")
    return rec.events[0]


def impression(name, datafile_rel, user_id, attrs, flag, want_rule, want_variation):
    client, rec = client_for(datafile_rel)
    d = client.create_user_context(user_id, copy.copy(attrs)).decide(flag)
    if (d.rule_key, d.variation_key) != (want_rule, want_variation):
        sys.exit(f"{name}: decided {d.rule_key}/{d.variation_key}, "
                 f"expected {want_rule}/{want_variation}")
    write_json(f"{OUT_DIR}/{name}.json", {
        "sdk_call": f"create_user_context({user_id!r}, {attrs!r}).decide({flag!r})",
        "datafile": datafile_rel,
        "call": {
            "kind": "impression",
            "user_id": user_id,
            "attributes": encode_attributes(attrs),
            "flag_key": flag,
            "rule_key": d.rule_key,
            "variation_key": d.variation_key,
            "enabled": d.enabled,
        },
        "log_event": only_event(rec, name),
    })


def conversion(name, datafile_rel, user_id, attrs, event_key, tags):
    client, rec = client_for(datafile_rel)
    client.track(event_key, user_id, copy.copy(attrs), copy.deepcopy(tags))
    write_json(f"{OUT_DIR}/{name}.json", {
        "sdk_call": f"track({event_key!r}, {user_id!r}, {attrs!r}, {tags!r})",
        "datafile": datafile_rel,
        "call": {
            "kind": "conversion",
            "user_id": user_id,
            "attributes": encode_attributes(attrs),
            "event_key": event_key,
            "tags": tags,
        },
        "log_event": only_event(rec, name),
    })


def write_datafiles():
    base = json.loads(load(SHARED_DATAFILE))

    rev = copy.deepcopy(base)
    rev["revision"] = "132"
    rev["botFiltering"] = False
    rev["anonymizeIP"] = False
    # An experiment inside a group is still a rule of its flag.
    mvt = next(e for e in rev["experiments"] if e["key"] == "search_ranking_mvt")
    rev["experiments"].remove(mvt)
    rev["groups"] = [{
        "id": "19228",
        "policy": "random",
        "experiments": [mvt],
        "trafficAllocation": [{"entityId": mvt["id"], "endOfRange": 10000}],
    }]
    write_json(f"{OUT_DIR}/datafile-rev132.json", rev)

    eu = copy.deepcopy(base)
    eu["region"] = "EU"
    del eu["botFiltering"]
    write_json(f"{OUT_DIR}/datafile-eu-nobot.json", eu)


GOLDEN = {"country": "DE", "plan": "free", "age": 34}

# Every kind of value the SDK filters out or keeps, among known and unknown keys.
ODD_ATTRIBUTES = {
    "age": float("nan"),
    "unknown_key": "dropped: not in the datafile",
    "country": "FR",
    "$opt_user_agent": "Mozilla/5.0 (kept: reserved prefix)",
    "plan": None,
}
ODD_VALUES = [
    ("plan", ["a", "list"]),
    ("plan", {"a": "dict"}),
    ("age", float("inf")),
    ("age", float("-inf")),
    ("age", 2**53 + 1),
    ("age", -(2**53 + 1)),
    ("age", 1e300),
    ("age", 2**53),
    ("age", -(2**53)),
    ("age", 34.0),
    ("age", -0.0),
    ("age", 9007199254740992.0),
    ("plan", True),
    ("plan", ""),
    ("country", "Ünïcødé 🌍"),
]


def main():
    write_datafiles()
    rev132 = f"{OUT_DIR}/datafile-rev132.json"
    eu = f"{OUT_DIR}/datafile-eu-nobot.json"
    d = SHARED_DATAFILE

    premium = {"plan": "premium", "country": "FR"}
    free = {"country": "US", "plan": "free", "age": 51.5}

    # Impressions: A/B test, both rollout rules, a three-way test, odd attributes.
    impression("impression_golden_replay", d, "user-golden-1", GOLDEN,
               "checkout_redesign", "checkout_redesign_ab", "treatment")
    uid = find_user(d, "user-ab", free, "checkout_redesign", "checkout_redesign_ab", "control")
    impression("impression_feature_test_control", d, uid, free,
               "checkout_redesign", "checkout_redesign_ab", "control")
    uid = find_user(d, "user-premium", premium, "checkout_redesign", "premium_early_access", "on")
    impression("impression_rollout_premium", d, uid, premium,
               "checkout_redesign", "premium_early_access", "on")
    everyone_else = "default-rollout-123011-21537940595"
    uid = find_user(d, "user-free", free, "checkout_redesign", everyone_else, "off")
    impression("impression_rollout_default_off", d, uid, free,
               "checkout_redesign", everyone_else, "off")
    uid = find_user(d, "user-search", {}, "search_ranking", "search_ranking_mvt", "hybrid")
    impression("impression_search_ranking_no_attributes", d, uid, {},
               "search_ranking", "search_ranking_mvt", "hybrid")
    odd = dict(ODD_ATTRIBUTES)
    uid = find_user(d, "user-odd", odd, "checkout_redesign", "checkout_redesign_ab", "control")
    impression("impression_invalid_attributes", d, uid, odd,
               "checkout_redesign", "checkout_redesign_ab", "control")

    # One conversion per odd attribute value: the key is known, so only the value decides.
    for i, (key, value) in enumerate(ODD_VALUES):
        conversion(f"conversion_attribute_value_{i:02}", d, "user-attr", {key: value},
                   "add_to_cart", None)
    conversion("conversion_invalid_attributes", d, "user-odd", odd, "purchase",
               {"revenue": 100})

    # Conversions: tags.
    conversion("conversion_no_tags", d, "user-golden-1", GOLDEN, "purchase", None)
    conversion("conversion_empty_tags", d, "user-golden-1", GOLDEN, "purchase", {})
    conversion("conversion_unicode_nested_tags", d, "user-ünï-☃", GOLDEN, "purchase", {
        "category": "Schuhe – Größe 42 👟",
        "nested": {"a": [1, 2.5, {"b": None}], "ünï": "çødé", "deeper": {"x": {"y": [True]}}},
        "empty_object": {},
        "empty_list": [],
        "nothing": None,
        "big": 12345678901234567,
        "quote\"and\\backslash": "line\nbreak\ttab",
    })
    # The SDK's payload cleaner drops these four keys when null, at any depth, tags included.
    conversion("conversion_tags_reserved_nulls", d, "user-golden-1", GOLDEN, "purchase", {
        "revenue": None, "value": None, "tags": None, "decisions": None, "other": None,
        "nested": {"value": None, "kept": {"revenue": 1}, "list": [{"tags": None, "k": 1}]},
    })
    conversion("conversion_revenue_zero", d, "user-golden-1", GOLDEN, "purchase",
               {"revenue": 0})
    conversion("conversion_revenue_negative", d, "user-golden-1", GOLDEN, "purchase",
               {"revenue": -250, "value": -1.25})
    conversion("conversion_revenue_float", d, "user-golden-1", GOLDEN, "purchase",
               {"revenue": 42.5})
    conversion("conversion_revenue_integral_float", d, "user-golden-1", GOLDEN, "purchase",
               {"revenue": 4200.0})
    conversion("conversion_revenue_bool", d, "user-golden-1", GOLDEN, "purchase",
               {"revenue": True, "value": False})
    conversion("conversion_revenue_string", d, "user-golden-1", GOLDEN, "purchase",
               {"revenue": "4200"})
    conversion("conversion_value_numeric_string", d, "user-golden-1", GOLDEN, "purchase",
               {"value": "3.5"})
    conversion("conversion_value_string_python_float", d, "user-golden-1", GOLDEN, "purchase",
               {"value": " \t-1_000.25e-1\n"})
    conversion("conversion_value_string_exponent", d, "user-golden-1", GOLDEN, "purchase",
               {"value": "1E3"})
    conversion("conversion_value_string_leading_dot", d, "user-golden-1", GOLDEN, "purchase",
               {"value": "+.5"})
    conversion("conversion_value_string_invalid", d, "user-golden-1", GOLDEN, "purchase",
               {"value": "1,234"})
    conversion("conversion_value_string_bad_underscore", d, "user-golden-1", GOLDEN, "purchase",
               {"value": "1__0"})
    conversion("conversion_value_string_inf", d, "user-golden-1", GOLDEN, "purchase",
               {"value": "Infinity"})
    conversion("conversion_value_string_nan", d, "user-golden-1", GOLDEN, "purchase",
               {"value": "nan"})
    conversion("conversion_value_int", d, "user-golden-1", GOLDEN, "purchase",
               {"value": 7, "revenue": 4200})
    conversion("conversion_value_huge", d, "user-golden-1", GOLDEN, "purchase",
               {"value": 1e300})
    conversion("conversion_value_list", d, "user-golden-1", GOLDEN, "purchase",
               {"value": [1], "revenue": [1]})

    # Another revision (and no IP anonymisation, botFiltering false, a grouped experiment).
    impression("impression_rev132", rev132, "user-golden-1", GOLDEN,
               "checkout_redesign", "checkout_redesign_ab", "treatment")
    uid = find_user(rev132, "user-group", GOLDEN, "search_ranking", "search_ranking_mvt",
                    "semantic")
    impression("impression_rev132_grouped_experiment", rev132, uid, GOLDEN,
               "search_ranking", "search_ranking_mvt", "semantic")
    conversion("conversion_rev132", rev132, "user-golden-1", GOLDEN, "purchase",
               {"revenue": 4200, "value": 3.5, "category": "shoes"})

    # EU region, no botFiltering in the datafile: no $opt_bot_filtering attribute.
    impression("impression_eu_nobot", eu, "user-golden-1", GOLDEN,
               "checkout_redesign", "checkout_redesign_ab", "treatment")
    conversion("conversion_eu_nobot", eu, "user-golden-1", GOLDEN, "add_to_cart", None)


if __name__ == "__main__":
    main()
