"""`cityops kinds`: list the configured kinds, or check a folder of kind files (exit 2 if bad)."""

from __future__ import annotations

from pathlib import Path

from cityops.common.service import ConfigError, ServiceParser, entry_point, load_settings
from cityops.kinds.catalog import load_kinds
from cityops.kinds.spec import KindFileError
from cityops.kinds.startup import KindsSettings


@entry_point("cityops kinds")
def main(argv: list[str]) -> int:
    """Entry point of `cityops kinds`."""
    parser = ServiceParser(prog="cityops kinds", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="check every kind file and exit: 0 valid, 2 invalid (one line naming the file)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="FOLDER",
        help="the kinds folder (default: CITYOPS_KINDS_DIR, else the shipped kinds)",
    )
    parser.add_argument(
        "--models",
        type=Path,
        metavar="FOLDER",
        help="Smart Data Model schemas to check the mapping against "
        "(default: CITYOPS_SMART_DATA_MODELS_DIR, else not checked)",
    )
    args = parser.parse_args(argv)
    settings = load_settings(KindsSettings)
    folder = args.dir or settings.kinds_dir
    models = args.models or settings.smart_data_models_dir
    try:
        catalog = load_kinds(folder, models_dir=models)
    except KindFileError as exc:
        raise ConfigError(str(exc)) from None
    if args.check:
        checked = "; Smart Data Model mapping checked" if models else ""
        print(f"{catalog.folder}: {len(catalog)} kinds OK ({', '.join(catalog.names)}){checked}")
        return 0
    for spec in catalog:
        fields = ", ".join(spec.field_names)
        print(f"{spec.name}: {spec.title}; every {spec.reporting_interval_s} s; fields {fields}")
    return 0
