"""Where an ONNX file that protobuf refuses stops being readable: a walk over its wire format.

protobuf says only that a message did not parse. When it does, `diagnose` walks the bytes along ONNX's
schema (only the fields that hold messages; every other field is skipped by its wire type) and returns
the path of the field where the bytes break ("graph.node[3].attribute[0].t", with the byte offset and
what is wrong), or, for a file whose messages nest deeper than protobuf reads, how deep and where.
"""
PROTOBUF_MAX_DEPTH = 100

# message -> {field number: (name, message type)}; a name ending in "[]" is a repeated field.
_SCHEMA = {
    "Model": {7: ("graph", "Graph"), 8: ("opset_import[]", "OperatorSetId"), 14: ("metadata_props[]", "Entry"),
              20: ("training_info[]", "TrainingInfo"), 25: ("functions[]", "Function")},
    "Graph": {1: ("node[]", "Node"), 5: ("initializer[]", "Tensor"), 15: ("sparse_initializer[]", "SparseTensor"),
              11: ("input[]", "ValueInfo"), 12: ("output[]", "ValueInfo"), 13: ("value_info[]", "ValueInfo"),
              16: ("metadata_props[]", "Entry")},
    "Node": {5: ("attribute[]", "Attribute"), 9: ("metadata_props[]", "Entry")},
    "Attribute": {5: ("t", "Tensor"), 6: ("g", "Graph"), 22: ("sparse_tensor", "SparseTensor"), 14: ("tp", "Type"),
                  10: ("tensors[]", "Tensor"), 11: ("graphs[]", "Graph"), 23: ("sparse_tensors[]", "SparseTensor"),
                  15: ("type_protos[]", "Type")},
    "Tensor": {3: ("segment", "Segment"), 13: ("external_data[]", "Entry"), 16: ("metadata_props[]", "Entry")},
    "SparseTensor": {1: ("values", "Tensor"), 2: ("indices", "Tensor")},
    "ValueInfo": {2: ("type", "Type"), 4: ("metadata_props[]", "Entry")},
    "Type": {1: ("tensor_type", "TensorType"), 4: ("sequence_type", "ElementType"), 5: ("map_type", "MapType"),
             9: ("optional_type", "ElementType"), 8: ("sparse_tensor_type", "TensorType")},
    "TensorType": {2: ("shape", "Shape")},
    "ElementType": {1: ("elem_type", "Type")},
    "MapType": {2: ("value_type", "Type")},
    "Shape": {1: ("dim[]", "Dimension")},
    "TrainingInfo": {1: ("initialization", "Graph"), 2: ("algorithm", "Graph"),
                     3: ("initialization_binding[]", "Entry"), 4: ("update_binding[]", "Entry")},
    "Function": {11: ("attribute_proto[]", "Attribute"), 7: ("node[]", "Node"), 9: ("opset_import[]", "OperatorSetId"),
                 12: ("value_info[]", "ValueInfo"), 14: ("metadata_props[]", "Entry")},
}
_PATH_CHARS = 120


def diagnose(data, max_depth=PROTOBUF_MAX_DEPTH):
    """A phrase saying where the serialized ModelProto `data` breaks, or None when its structure is sound.

    Returns ("depth", phrase) when messages nest deeper than `max_depth`, ("broken", phrase) for bytes
    that are not protobuf, and None otherwise.
    """
    # Each frame: [position, end, message type, path, {field number: times seen}]
    stack = [[0, len(data), "Model", "", {}]]
    while stack:
        frame = stack[-1]
        position, end, message, path, seen = frame
        if position == end:
            stack.pop()
            continue
        where = path or "the model's top level"
        tag, position = _varint(data, position, end)
        if tag is None:
            return "broken", "a field tag at byte %d of %s is cut short" % (frame[0], where)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            return "broken", "field number 0 at byte %d of %s" % (frame[0], where)
        if wire_type == 0:
            value, position = _varint(data, position, end)
            if value is None:
                return "broken", "a number at byte %d of %s is cut short" % (frame[0], where)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
            if position > end:
                return "broken", "a fixed-size value at byte %d of %s runs past its end" % (frame[0], where)
        elif wire_type == 2:
            length, start = _varint(data, position, end)
            if length is None or start + length > end:
                field = _SCHEMA.get(message, {}).get(number, ("field %d" % number, None))[0].rstrip("[]")
                return "broken", "the length of %s at byte %d of %s runs past its end" % (field, frame[0], where)
            position = start + length
            field = _SCHEMA.get(message, {}).get(number)
            if field is not None:
                name, child = field
                if name.endswith("[]"):
                    index = seen.get(number, 0)
                    seen[number] = index + 1
                    name = "%s[%d]" % (name[:-2], index)
                child_path = "%s.%s" % (path, name) if path else name
                if len(stack) >= max_depth:
                    return "depth", "more than %d messages deep at %s" % (max_depth, _shorten(child_path))
                frame[0] = position
                stack.append([start, start + length, child, child_path, {}])
                continue
        else:
            return "broken", "wire type %d, which protobuf does not have, at byte %d of %s" % (
                wire_type, frame[0], where)
        frame[0] = position
    return None


def _varint(data, position, end):
    """(value, next position), or (None, position) when the varint is cut short or longer than 10 bytes."""
    value = shift = 0
    for index in range(position, min(end, position + 10)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return None, position


def _shorten(path):
    if len(path) <= _PATH_CHARS:
        return path
    return path[: _PATH_CHARS // 2] + "..." + path[-_PATH_CHARS // 2:]


def unreadable_model_message(path, data, error):
    """The sentence for a model file at `path` whose bytes `data` protobuf refused with `error`."""
    found = diagnose(data)
    if "MaxDepth" in str(error) or (found is not None and found[0] == "depth"):
        where = " (%s)" % found[1] if found is not None and found[0] == "depth" else ""
        return ("%s nests its messages (subgraphs within subgraphs) deeper than protobuf's limit of %d levels%s; "
                "the model may be valid, but protobuf cannot read it" % (path, PROTOBUF_MAX_DEPTH, where))
    if found is not None:
        return "%s is not an ONNX model, or it is truncated or corrupted: %s" % (path, found[1])
    return "%s is not an ONNX model, or it is truncated or corrupted (its protobuf does not parse)" % path
