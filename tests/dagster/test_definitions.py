"""Loading the code location: Dagster's preview and beta notices for the two APIs sway pins
(backfill_policy, partitioned asset checks) are silenced where the assets are built, and only
those."""

from __future__ import annotations

import warnings

import dagster as dg

from sway_dagster.assets import MODEL_BACKFILL, pinned_preview_apis
from sway_dagster.definitions import JOB_NAME, build_definitions


def dagster_notices(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message) for w in caught if issubclass(w.category, dg.PreviewWarning | dg.BetaWarning)
    ]


def test_loading_the_definitions_emits_no_preview_or_beta_notice(home) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs = build_definitions(home)
        defs.resolve_asset_graph()
        defs.resolve_job_def(JOB_NAME)
    assert dagster_notices(caught) == []


def test_another_beta_api_still_warns_where_the_pinned_ones_are_silenced() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pinned_preview_apis():

            @dg.asset(
                backfill_policy=MODEL_BACKFILL,
                resource_defs={"unused": dg.ResourceDefinition.none_resource()},
            )
            def beta_user() -> None: ...

    (notice,) = dagster_notices(caught)
    assert notice.startswith("Parameter `resource_defs`")
