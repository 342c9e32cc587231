"""The calibration campaign: test definitions, scripts, durations, presets, the campaign
configuration / definition and the structure check (see campaign.md).

    from shared.campaign import get_test
    script = get_test("PTC01").script({"frames": [4] * 11}, "CHAMBER_B_BORN", {"operator": "ab"})
    script.total_frames, script.duration_s
"""

from shared.campaign.catalogue import (
    FAMILIES,
    NL_FLUENCES,
    WAVELENGTHS,
    Chamber,
    TestDefinition,
    TestParams,
    get_test,
    naming_help,
    validation_message,
)
from shared.campaign.config import (
    CampaignConfig,
    CampaignDefinition,
    Equipment,
    TestEntry,
    TestPlan,
    campaign_preset,
    PresetTests,
    define_campaign,
    load_campaign,
    load_campaign_config,
)
from shared.campaign.keys import DEFAULTS, EQUIPMENT_KEYS, SCRIPT_KEYS, STRING_KEYS, compose, iphi_string
from shared.campaign.script import Script, ScriptColumn, frame_duration_s
from shared.campaign.structure import RTOL, StructureResult, check_structure, compare_value, explog_values

__all__ = [
    "DEFAULTS", "EQUIPMENT_KEYS", "FAMILIES", "NL_FLUENCES", "RTOL", "SCRIPT_KEYS", "STRING_KEYS", "WAVELENGTHS",
    "CampaignConfig", "CampaignDefinition", "Chamber", "Equipment", "Script", "ScriptColumn", "StructureResult",
    "TestDefinition", "TestEntry", "TestParams", "TestPlan", "campaign_preset", "check_structure", "compare_value",
    "compose", "define_campaign", "explog_values", "frame_duration_s", "get_test", "iphi_string", "load_campaign", "load_campaign_config", "PresetTests",
    "naming_help", "validation_message",
]
