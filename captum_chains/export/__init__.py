"""Exact physical export of a SubNetwork: a standalone module with only the kept filters.

Public API
----------
``export_subnetwork(subnetwork, **kw) -> ExportedSubNetwork``
    The export (also ``SubNetwork.export()``).
``verify(exported, subnetwork, inputs) -> float``
    Max absolute difference between export and SubNetwork.
ExportReport, count_parameters, count_macs
    Size before/after (parameters, multiply-accumulates).
Rule, ChannelInfo, Decline, register_module_rule, register_function_rule, register_method_rule
    Extension point: teach the export a new layer type (see ``docs/export.md``).
CANONICALIZERS, SITE_RESOLVERS, EXTENSIONS
    Rewrite modules of the private copy before recording; place scores of special unit
    hooks (both live in :mod:`captum_chains.units.adapters`); your modules to import before
    each export.
"""

from typing import TYPE_CHECKING

from captum_chains._utils.lazy import attach

if TYPE_CHECKING:  # what type checkers see; the same names as in attach() below
    from captum_chains.export.api import (
        EXTENSIONS,
        ExportedSubNetwork,
        check_model,
        export_subnetwork,
        load_extensions,
    )
    from captum_chains.export.report import ExportReport, count_macs, count_parameters, verify
    from captum_chains.export.rules import (
        ChannelInfo,
        Decline,
        Rule,
        register_function_rule,
        register_method_rule,
        register_module_rule,
    )
    from captum_chains.export.tracing import CANONICALIZERS, SITE_RESOLVERS, ExportError

__getattr__, __dir__ = attach(
    __name__,
    {
        "api": [
            "EXTENSIONS",
            "ExportedSubNetwork",
            "check_model",
            "export_subnetwork",
            "load_extensions",
        ],
        "report": ["ExportReport", "count_macs", "count_parameters", "verify"],
        "rules": [
            "ChannelInfo",
            "Decline",
            "Rule",
            "register_function_rule",
            "register_method_rule",
            "register_module_rule",
        ],
        "tracing": ["CANONICALIZERS", "SITE_RESOLVERS", "ExportError"],
    },
)

__all__ = [
    "CANONICALIZERS",
    "EXTENSIONS",
    "SITE_RESOLVERS",
    "ChannelInfo",
    "Decline",
    "ExportError",
    "ExportReport",
    "ExportedSubNetwork",
    "Rule",
    "check_model",
    "count_macs",
    "count_parameters",
    "export_subnetwork",
    "load_extensions",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
    "verify",
]
