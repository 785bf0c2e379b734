"""A JSON Schema (draft 2020-12) for manifests, generated from the field declarations — the same ones the
loader parses with — so editors (the YAML language server) complete and check what vmform accepts.

The schema checks shape: sections, keys, types, enums, patterns, required keys. Rules that need more than
one value (references to declared resources, cycles, ``backing`` only on qcow2) are vmform validate's.
"""

from __future__ import annotations

from typing import Any

from vmform import __version__
from vmform.schema.extra_xml import ExtraXml
from vmform.schema.kind import META_FIELDS
from vmform.schema.registry import KINDS
from vmform.schema.types import (
    Bool,
    Enum,
    FieldSpec,
    Int,
    IPv4Address,
    IPv4Interface,
    ListOf,
    Mac,
    Obj,
    Ref,
    Size,
    Str,
    ValueType,
)
from vmform.schema.xslt import Stylesheet

SCHEMA_ID = "https://vmform.dev/schemas/manifest.schema.json"
# Mirrors units.parse_size: a whole number of bytes, or a number with a binary unit.
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([bB]|[kKmMgGtTpP][iI][bB])?\s*$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
IPV4 = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"


def type_schema(value_type: ValueType) -> dict[str, Any]:
    """The JSON Schema of one declared value type."""
    if isinstance(value_type, Obj):
        schema = object_schema(value_type.fields, allowed_extra=value_type.extra_keys)
        if value_type.shorthand:
            return {"anyOf": [{"type": "string", "description": f"short for {{{value_type.shorthand}: …}}"}, schema]}
        return schema
    if isinstance(value_type, ListOf):
        schema = {"type": "array", "items": type_schema(value_type.item), "maxItems": value_type.max_items}
        if value_type.min_items:
            schema["minItems"] = value_type.min_items
        return schema
    if isinstance(value_type, Enum):
        return {"enum": list(value_type.choices)}
    if isinstance(value_type, Bool):
        return {"type": "boolean"}
    if isinstance(value_type, Int):
        schema = {"type": "integer"}
        if value_type.minimum is not None:
            schema["minimum"] = value_type.minimum
        if value_type.maximum is not None:
            schema["maximum"] = value_type.maximum
        return schema
    if isinstance(value_type, Size):
        return {"anyOf": [{"type": "integer", "minimum": value_type.minimum},
                          {"type": "string", "pattern": SIZE_PATTERN}],
                "description": "a size: bytes, or a number with a binary unit (KiB, MiB, GiB, TiB)"}
    if isinstance(value_type, Mac):
        return {"type": "string", "pattern": r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"}
    if isinstance(value_type, IPv4Interface):
        return {"type": "string", "pattern": f"^{IPV4}/([0-9]|[12][0-9]|3[0-2])$"}
    if isinstance(value_type, IPv4Address):
        return {"type": "string", "pattern": f"^{IPV4}$"}
    if isinstance(value_type, Ref):
        return {"type": "string", "minLength": 1, "description": f"the name of a {value_type.kind} of the manifests"}
    if isinstance(value_type, Str):
        schema = {"type": "string", "maxLength": value_type.max_length}
        if value_type.pattern:
            schema["pattern"] = f"^(?:{value_type.pattern})$"
        return schema
    if isinstance(value_type, ExtraXml):
        return {"type": "object", "description": f"libvirt's {value_type.kind} XML, element by element"}
    if isinstance(value_type, Stylesheet):
        return {"anyOf": [{"type": "string"},
                          {"type": "object", "properties": {"file": {"type": "string"}}, "required": ["file"],
                           "additionalProperties": False}]}
    return {}  # a type this generator does not know yet: accept anything rather than reject valid manifests


# Any value may be an expression ("{{ var.prefix }}-web"), checked once evaluated.
EXPRESSION = {"type": "string", "pattern": "\\{\\{|\\{%", "description": "an expression (Jinja2, sandboxed)"}


def _field_schema(spec: FieldSpec) -> dict[str, Any]:
    schema = dict(type_schema(spec.type))
    if schema:
        schema = {"anyOf": [schema, EXPRESSION]}
    text = spec.doc
    effect = spec.effect_doc or spec.effect.value
    if spec.compare:
        text += f" (a change takes effect: {effect})"
    if spec.default_doc:
        text += f" (default: {spec.default_doc})"
    schema["description"] = text
    if spec.default is not None:
        schema["default"] = spec.default
    return schema


def object_schema(fields: tuple[FieldSpec, ...], allowed_extra: tuple[str, ...] = ()) -> dict[str, Any]:
    properties = {spec.name: _field_schema(spec) for spec in fields}
    for key in allowed_extra:
        properties.setdefault(key, {})
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    required = [spec.name for spec in fields if spec.required]
    if required:
        schema["required"] = required
    return schema


def manifest_schema() -> dict[str, Any]:
    """The whole document: sections -> resource names -> each kind's fields (plus name, depends_on,
    lifecycle and restart_policy, which every resource accepts)."""
    definitions: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for kind in KINDS.values():
        resource = object_schema(kind.fields + META_FIELDS)
        resource["description"] = kind.doc
        definitions[kind.name] = resource
        sections[kind.section] = {
            "description": f"{kind.section}: resource name -> {kind.doc}",
            "type": ["object", "null"],
            "propertyNames": {"pattern": NAME_PATTERN},
            "additionalProperties": {"anyOf": [{"$ref": f"#/$defs/{kind.name}"}, {"type": "null"}]},
        }
    from vmform.manifest.variables import TYPES

    sections["variables"] = {
        "description": "variables: name -> {type, default, description, sensitive} (or a default value)",
        "type": ["object", "null"],
        "propertyNames": {"pattern": "^[A-Za-z][A-Za-z0-9_]{0,63}$"},
        "additionalProperties": {"anyOf": [
            {"type": "object", "additionalProperties": False, "properties": {
                "type": {"enum": list(TYPES)}, "default": {}, "description": {"type": "string"},
                "sensitive": {"type": "boolean"}}},
            {"not": {"type": "object"}}]},
    }
    sections["outputs"] = {
        "description": "outputs: name -> {value, description, sensitive} (or the value), evaluated after apply",
        "type": ["object", "null"],
        "propertyNames": {"pattern": "^[A-Za-z][A-Za-z0-9_]{0,63}$"},
        "additionalProperties": {"anyOf": [
            {"type": "object", "required": ["value"], "additionalProperties": False, "properties": {
                "value": {}, "description": {"type": "string"}, "sensitive": {"type": "boolean"}}},
            {"not": {"type": "object"}}]},
    }
    sections["modules"] = {
        "description": "modules: name -> {source, inputs, count | for_each, depends_on}: a directory of manifests "
                       "used with inputs; its resources are addressed module.NAME.KIND.KEY",
        "type": ["object", "null"],
        "propertyNames": {"pattern": "^[A-Za-z][A-Za-z0-9_-]{0,63}$"},
        "additionalProperties": {
            "type": "object", "required": ["source"], "additionalProperties": False, "properties": {
                "source": {"type": "string", "description": "the module's directory, relative to this file"},
                "inputs": {"type": ["object", "null"], "description": "values of the module's variables"},
                "count": {"type": ["integer", "string"]},
                "for_each": {"type": ["object", "array", "string"]},
                "depends_on": {"type": "array", "items": {"type": "string"}}}},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"vmform manifest (vmform {__version__})",
        "description": "A vmform manifest: sections of resources by name. Generated by `vmform schema`.",
        "type": ["object", "null"],
        "properties": sections,
        "additionalProperties": False,
        "$defs": definitions,
    }
