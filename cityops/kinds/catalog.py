"""The configured kinds: a folder of kind files, checked and compiled once at start.

Every service builds one `KindCatalog` in `main()` from `CITYOPS_KINDS_DIR` (unset: the
shipped kinds, package data in `cityops/kinds/shipped/`) and passes it down. A wrong file
stops the service at start with one line naming the file, the kind and the field.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from cityops.common.events import ReadingBase
from cityops.kinds.readings import compile_reading_model
from cityops.kinds.smart_data_models import SmartDataModels
from cityops.kinds.spec import KIND_FILE_SUFFIX, KindFileError, KindSpec, read_kind_file

MAX_KINDS = 64  # a kind is a metric label and a topic level: a small, fixed set


def shipped_kinds_dir() -> Path:
    """The kinds cityops ships (package data; copy the folder to change or add kinds)."""
    return Path(str(resources.files("cityops.kinds") / "shipped"))


@dataclass(frozen=True, slots=True)
class KindCatalog:
    """The kinds a deployment accepts: their files, compiled models and the reading union."""

    folder: str
    specs: Mapping[str, KindSpec]
    models: Mapping[str, type[ReadingBase]]
    # validates any reading, picking the model by its `kind` (a pydantic discriminated union)
    reading_adapter: TypeAdapter[ReadingBase]

    @property
    def names(self) -> tuple[str, ...]:
        """The kind names, sorted."""
        return tuple(self.specs)

    def __contains__(self, kind: object) -> bool:
        return kind in self.specs

    def __iter__(self) -> Iterator[KindSpec]:
        return iter(self.specs.values())

    def __len__(self) -> int:
        return len(self.specs)

    def spec(self, kind: str) -> KindSpec:
        """The definition of a configured kind (KeyError for any other)."""
        return self.specs[kind]

    def model(self, kind: str) -> type[ReadingBase]:
        """The compiled reading model of a configured kind."""
        return self.models[kind]

    def reporting_interval_s(self, kind: str) -> int:
        """How often a device of `kind` reports when the registry says nothing else."""
        return self.specs[kind].reporting_interval_s

    def parse_reading(self, payload: bytes | str) -> ReadingBase:
        """Validate one reading from JSON; raises pydantic.ValidationError."""
        return self.reading_adapter.validate_json(payload)


def build_catalog(specs: Iterable[KindSpec], *, folder: str) -> KindCatalog:
    """Compile checked kind specs; raises KindFileError for what spans files."""
    by_name = {spec.name: spec for spec in sorted(specs, key=lambda s: s.name)}
    if not by_name:
        raise KindFileError(folder, f"no kind files (*{KIND_FILE_SUFFIX}) in the kinds folder")
    if len(by_name) > MAX_KINDS:
        raise KindFileError(folder, f"{len(by_name)} kinds; at most {MAX_KINDS}")
    prefixes: dict[str, str] = {}
    for spec in by_name.values():
        other = prefixes.setdefault(spec.simulator.id_prefix, spec.name)
        if other != spec.name:
            raise KindFileError(
                spec.source,
                f"simulator.id_prefix {spec.simulator.id_prefix!r} is also kind {other!r}'s",
                kind=spec.name,
            )
    models = {name: compile_reading_model(spec) for name, spec in by_name.items()}
    union: Any
    if len(models) == 1:
        union = next(iter(models.values()))
    else:
        union = Annotated[Union[tuple(models.values())], Field(discriminator="kind")]  # noqa: UP007 - a runtime union of compiled models
    return KindCatalog(
        folder=folder,
        specs=MappingProxyType(by_name),
        models=MappingProxyType(models),
        reading_adapter=TypeAdapter(union),
    )


def load_kinds(folder: Path | None = None, *, models_dir: Path | None = None) -> KindCatalog:
    """Read, check and compile every `<kind>.yaml` of `folder` (the shipped kinds if None).

    With `models_dir` (a folder of Smart Data Model schemas) every field's model and attribute
    must exist there. Raises KindFileError (one line: file, kind, field).
    """
    folder = folder or shipped_kinds_dir()
    if not folder.is_dir():
        raise KindFileError(str(folder), "the kinds folder does not exist or is not a folder")
    files = []
    for path in sorted(folder.iterdir()):
        if path.suffix == KIND_FILE_SUFFIX:
            files.append(path)
        elif path.suffix == ".yml":  # a kind file under the wrong name would be ignored silently
            raise KindFileError(str(path), f"bad name: kind files end in {KIND_FILE_SUFFIX}")
    catalog = build_catalog((read_kind_file(path) for path in files), folder=str(folder))
    if models_dir is not None:
        if not models_dir.is_dir():
            raise KindFileError(str(models_dir), "the Smart Data Models folder does not exist")
        models = SmartDataModels(models_dir)
        for spec in catalog:
            models.check(spec)
    return catalog


@functools.cache
def shipped_kinds() -> KindCatalog:
    """The shipped kinds, compiled once per process (tools and tests; services load theirs)."""
    return load_kinds(None)
