package io.meterline.interop;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.TreeMap;
import java.util.concurrent.Future;

import com.fasterxml.jackson.databind.JsonNode;

import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.utils.Utils;

/**
 * meterline-interop: independent Avro (Java) + Kafka (Java client) tools.
 *
 * <pre>
 *   fingerprint FILE.avsc...
 *   canonical FILE.avsc
 *   partition --partitions N KEY...
 *   read --bootstrap H:P --topic T --schema F.avsc [--framing single-object|confluent]
 *        [--registry URL] [--timeout-s N] [--check-partitioner]
 *   produce --bootstrap H:P --topic T --schema F.avsc [--framing ...] [--registry URL] &lt; jsonl
 * </pre>
 *
 * Exit codes: 0 ok; 1 some record failed (decode, delivery, partitioner check) or the end
 * offsets were not reached in time; 2 usage or setup error (bad arguments, unknown topic).
 */
public final class Main {
    private Main() {}

    static final PrintStream OUT = new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);
    static final PrintStream ERR = new PrintStream(new FileOutputStream(FileDescriptor.err), true, StandardCharsets.UTF_8);

    static final class Usage extends Exception {
        private static final long serialVersionUID = 1L;

        Usage(String message) {
            super(message);
        }
    }

    /** --name value options, --flag flags, and positional arguments. */
    static final class Args {
        final Map<String, String> opts = new HashMap<>();
        final Set<String> flags = new HashSet<>();
        final List<String> positional = new ArrayList<>();

        Args(String[] a, int from, Set<String> flagNames) throws Usage {
            for (int i = from; i < a.length; i++) {
                String s = a[i];
                if (s.startsWith("--")) {
                    String name = s.substring(2);
                    int eq = name.indexOf('=');
                    if (eq >= 0) {
                        opts.put(name.substring(0, eq), name.substring(eq + 1));
                    } else if (flagNames.contains(name)) {
                        flags.add(name);
                    } else {
                        if (i + 1 >= a.length) throw new Usage("missing value for " + s);
                        opts.put(name, a[++i]);
                    }
                } else {
                    positional.add(s);
                }
            }
        }

        String need(String name) throws Usage {
            String v = opts.get(name);
            if (v == null) throw new Usage("missing --" + name);
            return v;
        }

        String get(String name, String dflt) {
            return opts.getOrDefault(name, dflt);
        }
    }

    static final String USAGE = String.join("\n",
            "usage: java -jar meterline-interop.jar COMMAND ...",
            "  fingerprint FILE.avsc...     '<file> <16 hex>' per file: the 8 single-object header bytes",
            "  canonical FILE.avsc          the schema's Parsing Canonical Form",
            "  partition --partitions N KEY...   '<key> <partition>' of Java's default partitioner",
            "  read --bootstrap H:P --topic T --schema F.avsc [--framing single-object|confluent]",
            "       [--registry URL] [--timeout-s 60] [--check-partitioner]",
            "       JSON lines {\"partition\",\"offset\",\"key\",\"value\"} sorted by partition, offset",
            "  produce --bootstrap H:P --topic T --schema F.avsc [--framing ...] [--registry URL] < jsonl",
            "       input lines {\"key\":..., \"value\":{...}} in the read contract (partition/offset ignored)");

    public static void main(String[] argv) {
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        System.setProperty("org.slf4j.simpleLogger.logFile", "System.err");
        int rc;
        try {
            if (argv.length == 0) throw new Usage("no command");
            switch (argv[0]) {
                case "fingerprint": rc = fingerprint(new Args(argv, 1, Set.of())); break;
                case "canonical": rc = canonical(new Args(argv, 1, Set.of())); break;
                case "partition": rc = partition(new Args(argv, 1, Set.of())); break;
                case "read": rc = read(new Args(argv, 1, Set.of("check-partitioner"))); break;
                case "produce": rc = produce(new Args(argv, 1, Set.of())); break;
                case "-h": case "--help": case "help": OUT.println(USAGE); rc = 0; break;
                default: throw new Usage("unknown command " + argv[0]);
            }
        } catch (Usage e) {
            ERR.println("error: " + e.getMessage());
            ERR.println(USAGE);
            rc = 2;
        } catch (Exception e) {
            ERR.println("error: " + e);
            rc = 2;
        }
        OUT.flush();
        ERR.flush();
        System.exit(rc);
    }

    // ---------------------------------------------------------------- fingerprint

    /** A value of any schema, for the BinaryMessageEncoder cross-check. */
    static Object sample(Schema s) {
        switch (s.getType()) {
            case RECORD: {
                GenericData.Record r = new GenericData.Record(s);
                for (Schema.Field f : s.getFields()) r.put(f.pos(), sample(f.schema()));
                return r;
            }
            case ENUM: return new GenericData.EnumSymbol(s, s.getEnumSymbols().get(0));
            case ARRAY: return new GenericData.Array<>(0, s);
            case MAP: return new HashMap<String, Object>();
            case UNION: return sample(s.getTypes().get(0));
            case FIXED: return new GenericData.Fixed(s, new byte[s.getFixedSize()]);
            case STRING: return "x";
            case BYTES: return ByteBuffer.wrap(new byte[] {1});
            case INT: return 1;
            case LONG: return 1L;
            case FLOAT: return 1f;
            case DOUBLE: return 1d;
            case BOOLEAN: return true;
            default: return null;
        }
    }

    static int fingerprint(Args a) throws Exception {
        if (a.positional.isEmpty()) throw new Usage("fingerprint needs at least one .avsc file");
        for (String f : a.positional) {
            Schema s = Codec.parse(new File(f));
            byte[] fp = Codec.fingerprintBytes(s);
            // Cross-check: the header that BinaryMessageEncoder actually writes.
            Object rec = sample(s);
            byte[] msg = Codec.encodeSingleObject(s, rec);
            if (msg.length < 10 || (msg[0] & 0xff) != 0xC3 || msg[1] != 0x01 || !Arrays.equals(msg, 2, 10, fp, 0, 8)) {
                ERR.println("error: " + f + ": BinaryMessageEncoder wrote header " + Codec.hex(msg, 0, Math.min(10, msg.length))
                        + ", expected c301" + Codec.hex(fp));
                return 1;
            }
            Object back = new BinaryMessageDecoder<Object>(GenericData.get(), s).decode(msg);
            if (!rec.equals(back)) {
                ERR.println("error: " + f + ": BinaryMessageDecoder did not round-trip the sample record");
                return 1;
            }
            OUT.println(f + " " + Codec.hex(fp));
        }
        return 0;
    }

    static int canonical(Args a) throws Exception {
        if (a.positional.size() != 1) throw new Usage("canonical needs exactly one .avsc file");
        OUT.println(SchemaNormalization.toParsingForm(Codec.parse(new File(a.positional.get(0)))));
        return 0;
    }

    static int javaPartition(byte[] key, int n) {
        // The Java producer's default for keyed records (BuiltInPartitioner.partitionForKey).
        return Utils.toPositive(Utils.murmur2(key)) % n;
    }

    static int partition(Args a) throws Exception {
        int n = Integer.parseInt(a.need("partitions"));
        for (String k : a.positional) {
            OUT.println(k + " " + javaPartition(k.getBytes(StandardCharsets.UTF_8), n));
        }
        return 0;
    }

    // ---------------------------------------------------------------- read

    static String utf8Strict(byte[] b) throws CharacterCodingException {
        return StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                .onUnmappableCharacter(CodingErrorAction.REPORT).decode(ByteBuffer.wrap(b)).toString();
    }

    static Codec.Decoder decoderFor(Args a, Schema schema, String schemaFile) throws Usage {
        String framing = a.get("framing", "single-object");
        switch (framing) {
            case "single-object":
                return new Codec.SingleObject(schema, schemaFile);
            case "confluent":
                return new Codec.Confluent(schema, new Codec.Registry(a.need("registry")));
            default:
                throw new Usage("--framing must be single-object or confluent, not " + framing);
        }
    }

    static int read(Args a) throws Exception {
        String bootstrap = a.need("bootstrap");
        String topic = a.need("topic");
        String schemaFile = a.need("schema");
        Schema schema = Codec.parse(new File(schemaFile));
        Codec.Decoder decoder = decoderFor(a, schema, schemaFile);
        long timeoutMs = (long) (Double.parseDouble(a.get("timeout-s", "60")) * 1000);
        boolean checkPartitioner = a.flags.contains("check-partitioner");
        long deadline = System.currentTimeMillis() + timeoutMs;

        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.CLIENT_ID_CONFIG, "meterline-interop-java");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ALLOW_AUTO_CREATE_TOPICS_CONFIG, "false");
        p.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, "5000");

        // partition -> (offset -> line), printed sorted at the end
        Map<Integer, TreeMap<Long, String>> lines = new TreeMap<>();
        int failures = 0;
        long records = 0;
        try (KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(p)) {
            List<PartitionInfo> infos;
            try {
                infos = c.partitionsFor(topic, Duration.ofMillis(Math.max(1000, timeoutMs)));
            } catch (org.apache.kafka.common.errors.TimeoutException e) {
                infos = null;
            }
            if (infos == null || infos.isEmpty()) {
                ERR.println("error: topic " + topic + " not found on " + bootstrap);
                return 2;
            }
            int numPartitions = infos.size();
            List<TopicPartition> tps = new ArrayList<>();
            for (PartitionInfo i : infos) tps.add(new TopicPartition(topic, i.partition()));
            c.assign(tps);
            c.seekToBeginning(tps);
            // read_committed: the last stable offset. It counts transaction markers, so
            // "done" is position >= end, not "received a record at end - 1".
            Map<TopicPartition, Long> end = c.endOffsets(tps, Duration.ofMillis(Math.max(1000, timeoutMs)));
            Set<TopicPartition> remaining = new HashSet<>();
            for (TopicPartition tp : tps) {
                lines.put(tp.partition(), new TreeMap<>());
                if (c.position(tp) < end.get(tp)) remaining.add(tp);
            }
            while (!remaining.isEmpty()) {
                if (System.currentTimeMillis() > deadline) {
                    StringBuilder s = new StringBuilder();
                    for (TopicPartition tp : remaining) {
                        s.append(' ').append(tp.partition()).append(": position ").append(c.position(tp))
                                .append(" < end ").append(end.get(tp)).append(';');
                    }
                    ERR.println("error: timed out after " + timeoutMs + " ms before reaching the end offsets:" + s);
                    failures++;
                    break;
                }
                ConsumerRecords<byte[], byte[]> batch = c.poll(Duration.ofMillis(200));
                for (ConsumerRecord<byte[], byte[]> r : batch) {
                    TopicPartition tp = new TopicPartition(r.topic(), r.partition());
                    if (r.offset() >= end.get(tp)) continue; // past the snapshot taken at start
                    records++;
                    String where = "partition " + r.partition() + " offset " + r.offset();
                    StringBuilder line = new StringBuilder(256);
                    line.append("{\"partition\":").append(r.partition()).append(",\"offset\":").append(r.offset())
                            .append(",\"key\":");
                    if (r.key() == null) {
                        line.append("null");
                    } else {
                        try {
                            Json.string(line, utf8Strict(r.key()));
                        } catch (CharacterCodingException e) {
                            ERR.println("error: " + where + ": key is not UTF-8: " + Codec.hex(r.key()));
                            failures++;
                            continue;
                        }
                        if (checkPartitioner && javaPartition(r.key(), numPartitions) != r.partition()) {
                            ERR.println("error: " + where + ": key " + new String(r.key(), StandardCharsets.UTF_8)
                                    + " belongs to partition " + javaPartition(r.key(), numPartitions)
                                    + " under Java's default partitioner (murmur2)");
                            failures++;
                        }
                    }
                    line.append(",\"value\":");
                    if (r.value() == null) {
                        line.append("null"); // tombstone
                    } else {
                        try {
                            GenericRecord v = decoder.decode(r.value());
                            Json.value(line, v, v.getSchema());
                        } catch (Codec.DecodeError | Json.InvalidDatum e) {
                            ERR.println("error: " + where + ": " + e.getMessage());
                            failures++;
                            continue;
                        }
                    }
                    line.append('}');
                    lines.get(r.partition()).put(r.offset(), line.toString());
                }
                remaining.removeIf(tp -> c.position(tp) >= end.get(tp));
            }
            ERR.println("read " + records + " records from " + numPartitions + " partitions of " + topic
                    + " (end offsets " + endSummary(end) + "), " + failures + " failures");
        }
        for (TreeMap<Long, String> part : lines.values()) {
            for (String l : part.values()) OUT.println(l);
        }
        OUT.flush();
        return failures == 0 ? 0 : 1;
    }

    static String endSummary(Map<TopicPartition, Long> end) {
        TreeMap<Integer, Long> m = new TreeMap<>();
        end.forEach((tp, o) -> m.put(tp.partition(), o));
        return m.toString();
    }

    // ---------------------------------------------------------------- produce

    static int produce(Args a) throws Exception {
        String bootstrap = a.need("bootstrap");
        String topic = a.need("topic");
        String schemaFile = a.need("schema");
        Schema schema = Codec.parse(new File(schemaFile));
        String framing = a.get("framing", "single-object");
        int schemaId = -1;
        if (framing.equals("confluent")) {
            schemaId = new Codec.Registry(a.need("registry")).register(topic + "-value", schema);
        } else if (!framing.equals("single-object")) {
            throw new Usage("--framing must be single-object or confluent, not " + framing);
        }
        BinaryMessageEncoder<Object> single = new BinaryMessageEncoder<>(GenericData.get(), schema);

        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.CLIENT_ID_CONFIG, "meterline-interop-java");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        p.put(ProducerConfig.LINGER_MS_CONFIG, "5");

        int failures = 0;
        long sent = 0;
        List<Future<RecordMetadata>> pending = new ArrayList<>();
        List<Integer> lineNos = new ArrayList<>();
        try (KafkaProducer<byte[], byte[]> prod = new KafkaProducer<>(p);
             BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
            String line;
            int no = 0;
            while ((line = in.readLine()) != null) {
                no++;
                if (line.isBlank()) continue;
                byte[] key;
                byte[] value;
                try {
                    JsonNode n = Codec.MAPPER.readTree(line);
                    JsonNode k = n.get("key");
                    key = (k == null || k.isNull()) ? null : k.asText().getBytes(StandardCharsets.UTF_8);
                    JsonNode v = n.get("value");
                    if (v == null || v.isNull()) {
                        value = null;
                    } else {
                        Object datum = FromJson.datum(v, schema, "value");
                        value = schemaId >= 0 ? Codec.encodeConfluent(schemaId, schema, datum) : Json.bytesOf(single.encode(datum));
                    }
                } catch (FromJson.Invalid | IOException e) {
                    ERR.println("error: stdin line " + no + ": " + e.getMessage());
                    failures++;
                    continue;
                }
                pending.add(prod.send(new ProducerRecord<>(topic, key, value)));
                lineNos.add(no);
                sent++;
            }
            prod.flush();
            for (int i = 0; i < pending.size(); i++) {
                try {
                    pending.get(i).get();
                } catch (java.util.concurrent.ExecutionException e) {
                    ERR.println("error: stdin line " + lineNos.get(i) + ": delivery failed: " + e.getCause());
                    failures++;
                }
            }
        }
        ERR.println("produced " + sent + " records to " + topic + ", " + failures + " failures");
        return failures == 0 ? 0 : 1;
    }
}
