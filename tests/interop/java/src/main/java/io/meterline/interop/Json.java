package io.meterline.interop;

import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Base64;
import java.util.Collection;
import java.util.List;
import java.util.Map;

import org.apache.avro.LogicalType;
import org.apache.avro.LogicalTypes;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericFixed;
import org.apache.avro.generic.GenericRecord;

/**
 * Renders Avro generic data as compact JSON, byte for byte the same as
 * tests/interop/python/interop_common.py (json.dumps(..., ensure_ascii=False,
 * separators=(",", ":"))):
 *
 * <ul>
 *   <li>record fields in schema order; map keys sorted by their UTF-8 bytes;
 *   <li>int and long as JSON numbers (timestamp-millis stays a number);
 *   <li>bytes/fixed with logicalType decimal as a plain decimal string with
 *       exactly {@code scale} fraction digits ("12", "-0.500000000000");
 *   <li>other bytes/fixed as standard base64 with padding;
 *   <li>enums as their symbol; unions unwrapped (the branch value itself).
 * </ul>
 */
final class Json {
    private Json() {}

    /** Thrown for data that is not valid for its schema (e.g. a decimal beyond its precision). */
    static final class InvalidDatum extends Exception {
        private static final long serialVersionUID = 1L;

        InvalidDatum(String message) {
            super(message);
        }
    }

    static void string(StringBuilder out, String s) {
        out.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': out.append("\\\""); break;
                case '\\': out.append("\\\\"); break;
                case '\n': out.append("\\n"); break;
                case '\r': out.append("\\r"); break;
                case '\t': out.append("\\t"); break;
                case '\b': out.append("\\b"); break;
                case '\f': out.append("\\f"); break;
                default:
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
            }
        }
        out.append('"');
    }

    static byte[] bytesOf(ByteBuffer bb) {
        ByteBuffer d = bb.duplicate();
        byte[] b = new byte[d.remaining()];
        d.get(b);
        return b;
    }

    /** The decimal string of a two's-complement big-endian unscaled value. */
    static String decimal(byte[] unscaled, LogicalTypes.Decimal d) throws InvalidDatum {
        if (unscaled.length == 0) {
            throw new InvalidDatum("decimal with zero-length bytes");
        }
        BigInteger u = new BigInteger(unscaled);
        int digits = u.signum() == 0 ? 1 : u.abs().toString().length();
        if (digits > d.getPrecision()) {
            throw new InvalidDatum("decimal " + u + " (unscaled) has " + digits
                    + " digits, more than its precision " + d.getPrecision());
        }
        return new BigDecimal(u, d.getScale()).toPlainString();
    }

    static void value(StringBuilder out, Object datum, Schema schema) throws InvalidDatum {
        LogicalType lt = schema.getLogicalType();
        switch (schema.getType()) {
            case NULL:
                out.append("null");
                break;
            case BOOLEAN:
                out.append(((Boolean) datum) ? "true" : "false");
                break;
            case INT:
            case LONG:
                out.append(((Number) datum).longValue());
                break;
            case FLOAT:
            case DOUBLE:
                // Not used by meterline's schemas; not part of the compared contract.
                out.append(((Number) datum).doubleValue());
                break;
            case STRING:
                string(out, datum.toString());
                break;
            case ENUM:
                string(out, datum.toString());
                break;
            case BYTES: {
                byte[] b = bytesOf((ByteBuffer) datum);
                if (lt instanceof LogicalTypes.Decimal) {
                    string(out, decimal(b, (LogicalTypes.Decimal) lt));
                } else {
                    string(out, Base64.getEncoder().encodeToString(b));
                }
                break;
            }
            case FIXED: {
                byte[] b = ((GenericFixed) datum).bytes();
                if (lt instanceof LogicalTypes.Decimal) {
                    string(out, decimal(b, (LogicalTypes.Decimal) lt));
                } else {
                    string(out, Base64.getEncoder().encodeToString(b));
                }
                break;
            }
            case ARRAY: {
                out.append('[');
                boolean first = true;
                for (Object item : (Collection<?>) datum) {
                    if (!first) out.append(',');
                    first = false;
                    value(out, item, schema.getElementType());
                }
                out.append(']');
                break;
            }
            case MAP: {
                Map<?, ?> m = (Map<?, ?>) datum;
                List<Object[]> entries = new ArrayList<>();
                for (Map.Entry<?, ?> e : m.entrySet()) {
                    String k = e.getKey().toString();
                    entries.add(new Object[] {k.getBytes(StandardCharsets.UTF_8), k, e.getValue()});
                }
                entries.sort((a, b) -> Arrays.compareUnsigned((byte[]) a[0], (byte[]) b[0]));
                out.append('{');
                boolean first = true;
                for (Object[] e : entries) {
                    if (!first) out.append(',');
                    first = false;
                    string(out, (String) e[1]);
                    out.append(':');
                    value(out, e[2], schema.getValueType());
                }
                out.append('}');
                break;
            }
            case UNION: {
                int i = GenericData.get().resolveUnion(schema, datum);
                value(out, datum, schema.getTypes().get(i));
                break;
            }
            case RECORD: {
                GenericRecord r = (GenericRecord) datum;
                out.append('{');
                boolean first = true;
                for (Schema.Field f : schema.getFields()) {
                    if (!first) out.append(',');
                    first = false;
                    string(out, f.name());
                    out.append(':');
                    value(out, r.get(f.pos()), f.schema());
                }
                out.append('}');
                break;
            }
            default:
                throw new InvalidDatum("unsupported schema type " + schema.getType());
        }
    }
}
