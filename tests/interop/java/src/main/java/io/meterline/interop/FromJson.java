package io.meterline.interop;

import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import com.fasterxml.jackson.databind.JsonNode;

import org.apache.avro.LogicalType;
import org.apache.avro.LogicalTypes;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;

/** The inverse of {@link Json}: the read contract's JSON back to Avro generic data. */
final class FromJson {
    private FromJson() {}

    static final class Invalid extends Exception {
        private static final long serialVersionUID = 1L;

        Invalid(String message) {
            super(message);
        }
    }

    private static byte[] unscaled(JsonNode n, LogicalTypes.Decimal d, String path) throws Invalid {
        if (!n.isTextual()) {
            throw new Invalid(path + ": decimal must be a JSON string");
        }
        BigDecimal v;
        try {
            v = new BigDecimal(n.asText());
        } catch (NumberFormatException e) {
            throw new Invalid(path + ": not a decimal: " + n.asText());
        }
        if (v.scale() > d.getScale()) {
            throw new Invalid(path + ": " + n.asText() + " has more than " + d.getScale() + " fraction digits");
        }
        BigInteger u = v.setScale(d.getScale()).unscaledValue();
        if (u.abs().toString().length() > d.getPrecision()) {
            throw new Invalid(path + ": " + n.asText() + " exceeds precision " + d.getPrecision());
        }
        return u.toByteArray();
    }

    static Object datum(JsonNode n, Schema s, String path) throws Invalid {
        LogicalType lt = s.getLogicalType();
        switch (s.getType()) {
            case NULL:
                if (n != null && !n.isNull()) throw new Invalid(path + ": expected null");
                return null;
            case BOOLEAN:
                if (n == null || !n.isBoolean()) throw new Invalid(path + ": expected a boolean");
                return n.asBoolean();
            case INT:
                if (n == null || !n.isIntegralNumber() || !n.canConvertToInt()) throw new Invalid(path + ": expected an int");
                return n.intValue();
            case LONG:
                if (n == null || !n.isIntegralNumber() || !n.canConvertToLong()) throw new Invalid(path + ": expected a long");
                return n.longValue();
            case FLOAT:
                if (n == null || !n.isNumber()) throw new Invalid(path + ": expected a number");
                return n.floatValue();
            case DOUBLE:
                if (n == null || !n.isNumber()) throw new Invalid(path + ": expected a number");
                return n.doubleValue();
            case STRING:
                if (n == null || !n.isTextual()) throw new Invalid(path + ": expected a string");
                return n.asText();
            case ENUM:
                if (n == null || !n.isTextual() || !s.hasEnumSymbol(n.asText())) {
                    throw new Invalid(path + ": expected one of " + s.getEnumSymbols());
                }
                return new GenericData.EnumSymbol(s, n.asText());
            case BYTES:
                if (n == null) throw new Invalid(path + ": missing");
                if (lt instanceof LogicalTypes.Decimal) {
                    return ByteBuffer.wrap(unscaled(n, (LogicalTypes.Decimal) lt, path));
                }
                if (!n.isTextual()) throw new Invalid(path + ": bytes must be a base64 string");
                return ByteBuffer.wrap(Base64.getDecoder().decode(n.asText()));
            case FIXED: {
                if (n == null) throw new Invalid(path + ": missing");
                byte[] b;
                if (lt instanceof LogicalTypes.Decimal) {
                    byte[] u = unscaled(n, (LogicalTypes.Decimal) lt, path);
                    if (u.length > s.getFixedSize()) throw new Invalid(path + ": decimal does not fit fixed " + s.getFixedSize());
                    b = new byte[s.getFixedSize()];
                    byte fill = (byte) (u[0] < 0 ? 0xff : 0);
                    int pad = b.length - u.length;
                    for (int i = 0; i < pad; i++) b[i] = fill;
                    System.arraycopy(u, 0, b, pad, u.length);
                } else {
                    if (!n.isTextual()) throw new Invalid(path + ": fixed must be a base64 string");
                    b = Base64.getDecoder().decode(n.asText());
                    if (b.length != s.getFixedSize()) throw new Invalid(path + ": fixed needs " + s.getFixedSize() + " bytes");
                }
                return new GenericData.Fixed(s, b);
            }
            case ARRAY: {
                if (n == null || !n.isArray()) throw new Invalid(path + ": expected an array");
                List<Object> items = new ArrayList<>();
                int i = 0;
                for (JsonNode item : n) {
                    items.add(datum(item, s.getElementType(), path + "[" + i++ + "]"));
                }
                return new GenericData.Array<>(s, items);
            }
            case MAP: {
                if (n == null || !n.isObject()) throw new Invalid(path + ": expected an object");
                Map<String, Object> m = new LinkedHashMap<>();
                for (Map.Entry<String, JsonNode> e : n.properties()) {
                    m.put(e.getKey(), datum(e.getValue(), s.getValueType(), path + "." + e.getKey()));
                }
                return m;
            }
            case UNION: {
                if (n == null || n.isNull()) {
                    for (Schema b : s.getTypes()) {
                        if (b.getType() == Schema.Type.NULL) return null;
                    }
                    throw new Invalid(path + ": null is not in the union");
                }
                StringBuilder why = new StringBuilder();
                for (Schema b : s.getTypes()) {
                    if (b.getType() == Schema.Type.NULL) continue;
                    try {
                        return datum(n, b, path);
                    } catch (Invalid e) {
                        why.append("; ").append(e.getMessage());
                    }
                }
                throw new Invalid(path + ": matches no branch of the union" + why);
            }
            case RECORD: {
                if (n == null || !n.isObject()) throw new Invalid(path + ": expected an object");
                GenericData.Record r = new GenericData.Record(s);
                for (Schema.Field f : s.getFields()) {
                    JsonNode v = n.get(f.name());
                    if (v == null && f.hasDefaultValue()) {
                        r.put(f.pos(), GenericData.get().getDefaultValue(f));
                    } else {
                        r.put(f.pos(), datum(v, f.schema(), path + "." + f.name()));
                    }
                }
                for (Map.Entry<String, JsonNode> e : n.properties()) {
                    String name = e.getKey();
                    if (s.getField(name) == null) throw new Invalid(path + ": unknown field " + name);
                }
                return r;
            }
            default:
                throw new Invalid(path + ": unsupported type " + s.getType());
        }
    }
}
