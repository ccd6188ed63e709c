package io.meterline.interop;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.time.Duration;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;

import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;

/** The two framings: Avro single-object encoding and the Confluent wire format. */
final class Codec {
    private Codec() {}

    static final ObjectMapper MAPPER = new ObjectMapper();

    /** A payload that cannot be decoded; the message says why. */
    static final class DecodeError extends Exception {
        private static final long serialVersionUID = 1L;

        DecodeError(String message) {
            super(message);
        }

        DecodeError(String message, Throwable cause) {
            super(message, cause);
        }
    }

    static String hex(byte[] b, int off, int len) {
        StringBuilder s = new StringBuilder(2 * len);
        for (int i = off; i < off + len && i < b.length; i++) {
            s.append(String.format("%02x", b[i] & 0xff));
        }
        return s.toString();
    }

    static String hex(byte[] b) {
        return hex(b, 0, b.length);
    }

    /** CRC-64-AVRO of the Parsing Canonical Form, as the 8 header bytes (little-endian). */
    static byte[] fingerprintBytes(Schema schema) {
        long fp = SchemaNormalization.parsingFingerprint64(schema);
        return ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(fp).array();
    }

    static Schema parse(java.io.File f) throws IOException {
        return new Schema.Parser().parse(f);
    }

    /** Decodes one record body strictly: it must consume every byte. */
    static GenericRecord decodeBody(byte[] v, int off, Schema writer, Schema reader) throws DecodeError {
        BinaryDecoder d = DecoderFactory.get().binaryDecoder(v, off, v.length - off, null);
        GenericRecord r;
        try {
            r = new GenericDatumReader<GenericRecord>(writer, reader).read(null, d);
        } catch (IOException | RuntimeException e) {
            throw new DecodeError("Avro body does not decode: " + e, e);
        }
        try {
            if (!d.isEnd()) {
                throw new DecodeError("trailing bytes after the Avro record (payload " + v.length + " bytes)");
            }
        } catch (IOException e) {
            throw new DecodeError("Avro body: " + e, e);
        }
        return r;
    }

    interface Decoder {
        GenericRecord decode(byte[] value) throws DecodeError;
    }

    static final class SingleObject implements Decoder {
        private final Schema schema;
        private final String schemaName;
        private final byte[] fp;
        private final BinaryMessageDecoder<GenericRecord> decoder;

        SingleObject(Schema schema, String schemaName) {
            this.schema = schema;
            this.schemaName = schemaName;
            this.fp = fingerprintBytes(schema);
            this.decoder = new BinaryMessageDecoder<>(GenericData.get(), schema);
        }

        @Override
        public GenericRecord decode(byte[] v) throws DecodeError {
            if (v.length < 10 || (v[0] & 0xff) != 0xC3 || v[1] != 0x01) {
                throw new DecodeError("not Avro single-object encoded: expected magic c301, payload starts "
                        + hex(v, 0, Math.min(v.length, 10)) + " (" + v.length + " bytes)");
            }
            if (!Arrays.equals(v, 2, 10, fp, 0, 8)) {
                throw new DecodeError("schema fingerprint " + hex(v, 2, 8) + " in the header does not match "
                        + schemaName + " (" + hex(fp) + ")");
            }
            GenericRecord r;
            try {
                r = decoder.decode(v);
            } catch (IOException | RuntimeException e) {
                throw new DecodeError("BinaryMessageDecoder: " + e, e);
            }
            // BinaryMessageDecoder ignores bytes after the record; be strict about them too.
            decodeBody(v, 10, schema, schema);
            return r;
        }
    }

    /** Confluent Schema Registry client: just GET /schemas/ids/{id} and POST /subjects/{s}/versions. */
    static final class Registry {
        private final String base;
        private final HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        private final Map<Integer, Object> byId = new HashMap<>(); // Schema or DecodeError

        Registry(String base) {
            this.base = base.endsWith("/") ? base.substring(0, base.length() - 1) : base;
        }

        Schema schema(int id) throws DecodeError {
            Object cached = byId.get(id);
            if (cached == null) {
                try {
                    cached = fetch(id);
                } catch (DecodeError e) {
                    cached = e;
                }
                byId.put(id, cached);
            }
            if (cached instanceof DecodeError) {
                throw (DecodeError) cached;
            }
            return (Schema) cached;
        }

        private Schema fetch(int id) throws DecodeError {
            String url = base + "/schemas/ids/" + id;
            try {
                HttpRequest req = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(30))
                        .header("Accept", "application/vnd.schemaregistry.v1+json, application/json").GET().build();
                HttpResponse<String> resp = http.send(req, HttpResponse.BodyHandlers.ofString());
                if (resp.statusCode() != 200) {
                    throw new DecodeError("GET " + url + ": HTTP " + resp.statusCode() + " " + resp.body());
                }
                JsonNode n = MAPPER.readTree(resp.body());
                JsonNode type = n.get("schemaType");
                if (type != null && !type.isNull() && !"AVRO".equals(type.asText())) {
                    throw new DecodeError("schema id " + id + " is " + type.asText() + ", not AVRO");
                }
                JsonNode refs = n.get("references");
                if (refs != null && refs.isArray() && refs.size() > 0) {
                    throw new DecodeError("schema id " + id + " has references, which this tool does not resolve");
                }
                JsonNode s = n.get("schema");
                if (s == null || !s.isTextual()) {
                    throw new DecodeError("GET " + url + ": no \"schema\" string in " + resp.body());
                }
                return new Schema.Parser().parse(s.asText());
            } catch (IOException | RuntimeException e) {
                throw new DecodeError("GET " + url + ": " + e, e);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new DecodeError("interrupted");
            }
        }

        int register(String subject, Schema schema) throws IOException, InterruptedException {
            String url = base + "/subjects/" + subject + "/versions";
            ObjectNode body = MAPPER.createObjectNode();
            body.put("schema", schema.toString());
            HttpRequest req = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(30))
                    .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                    .POST(HttpRequest.BodyPublishers.ofString(MAPPER.writeValueAsString(body))).build();
            HttpResponse<String> resp = http.send(req, HttpResponse.BodyHandlers.ofString());
            if (resp.statusCode() != 200) {
                throw new IOException("POST " + url + ": HTTP " + resp.statusCode() + " " + resp.body());
            }
            return MAPPER.readTree(resp.body()).get("id").asInt();
        }
    }

    static final class Confluent implements Decoder {
        private final Schema reader;
        private final Registry registry;

        Confluent(Schema reader, Registry registry) {
            this.reader = reader;
            this.registry = registry;
        }

        @Override
        public GenericRecord decode(byte[] v) throws DecodeError {
            if (v.length < 5 || v[0] != 0) {
                throw new DecodeError("not Confluent wire format: expected magic byte 00, payload starts "
                        + hex(v, 0, Math.min(v.length, 10)) + " (" + v.length + " bytes)");
            }
            int id = ByteBuffer.wrap(v, 1, 4).order(ByteOrder.BIG_ENDIAN).getInt();
            Schema writer = registry.schema(id);
            return decodeBody(v, 5, writer, reader);
        }
    }

    static byte[] encodeBody(Schema schema, Object datum) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        BinaryEncoder e = EncoderFactory.get().directBinaryEncoder(out, null);
        new GenericDatumWriter<Object>(schema).write(datum, e);
        e.flush();
        return out.toByteArray();
    }

    static byte[] encodeSingleObject(Schema schema, Object datum) throws IOException {
        ByteBuffer bb = new BinaryMessageEncoder<Object>(GenericData.get(), schema).encode(datum);
        return Json.bytesOf(bb);
    }

    static byte[] encodeConfluent(int id, Schema schema, Object datum) throws IOException {
        byte[] body = encodeBody(schema, datum);
        return ByteBuffer.allocate(5 + body.length).put((byte) 0).putInt(id).put(body).array();
    }
}
