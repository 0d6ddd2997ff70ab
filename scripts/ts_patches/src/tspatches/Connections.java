/*
 * Per-connection protection added to every TorchServe listener (ServerInitializer.initChannel ->
 * Connections.configure). TorchServe 0.12's pipeline is HttpServerCodec -> HttpObjectAggregator ->
 * HttpRequestHandler, with no timeout, no connection cap and no ordering of responses:
 *
 *  - ts-limit (first): at most TS_MAX_CONNECTIONS open connections over all listeners (default:
 *    half the JVM's file-descriptor limit). One over the cap is answered a plain 503 and closed at
 *    once, so the descriptors stay for the connections already served.
 *  - ts-idle: a connection with no request in flight that receives nothing for
 *    TS_IDLE_TIMEOUT_S seconds (default 60) is closed: idle keep-alives, a Content-Length longer
 *    than the body, a chunked body never finished. A request in flight is the worker's business
 *    (responseTimeout), never cut here.
 *  - ts-order (after the aggregator): one request at a time per connection. HTTP/1.1 pipelining
 *    sends several before the first answer; TorchServe answered each as soon as it was ready, so a
 *    slow prediction followed by /ping got /ping's answer first, and a client read one request's
 *    answer as another's. The next request is passed on only once the previous answer is written
 *    (at most MAX_WAITING held; reading pauses beyond that). A request the HTTP decoder could not
 *    parse (binary junk, a negative Content-Length) is answered 400 and the connection closed.
 *  - ts-register (after ts-order): an application/x-www-form-urlencoded body on an inference route
 *    (curl --data-binary's default) is passed on as application/octet-stream: the image. And
 *    POST /models with a model_name that is not a plain name
 *    (letters, digits, '_', '-', '.', starting with a letter or digit, no "..") or a url that is
 *    not a plain file name in the model store (no '/', '\', "..", control characters) is refused
 *    400. Such a name registered a worker no REST path could reach or remove ("../../x"), and
 *    "foo/" registered the model store folder itself. GET requests for the Open Inference
 *    Protocol's health and model routes are answered there too (V2Routes).
 */
package tspatches;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.buffer.Unpooled;
import io.netty.channel.Channel;
import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.ChannelPipeline;
import io.netty.channel.ChannelPromise;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpObject;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.handler.codec.http.LastHttpContent;
import io.netty.handler.codec.http.QueryStringDecoder;
import io.netty.handler.timeout.IdleStateEvent;
import io.netty.handler.timeout.IdleStateHandler;
import io.netty.util.ReferenceCountUtil;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.regex.Pattern;

public final class Connections {
    static final AtomicInteger OPEN = new AtomicInteger();
    static final int MAX_CONNECTIONS = envInt("TS_MAX_CONNECTIONS", defaultMaxConnections());
    static final int IDLE_TIMEOUT_S = envInt("TS_IDLE_TIMEOUT_S", 60);
    static final int MAX_WAITING = 16;
    static final Pattern MODEL_NAME = Pattern.compile("[A-Za-z0-9][A-Za-z0-9_.-]{0,127}");
    static final Pattern ARCHIVE_NAME = Pattern.compile("[A-Za-z0-9][A-Za-z0-9_.+-]{0,254}");

    private Connections() {}

    static int envInt(String name, int fallback) {
        String value = System.getenv(name);
        if (value == null || value.isEmpty()) {
            return fallback;
        }
        try {
            return Integer.parseInt(value.trim());
        } catch (NumberFormatException e) {
            System.err.println("ts-patches: " + name + "=" + value + " is not an integer; using " + fallback);
            return fallback;
        }
    }

    /** Half the process's file-descriptor limit (workers, logs and jars need the rest). */
    static int defaultMaxConnections() {
        Object os = ManagementFactory.getOperatingSystemMXBean();
        if (os instanceof com.sun.management.UnixOperatingSystemMXBean) {
            long limit = ((com.sun.management.UnixOperatingSystemMXBean) os).getMaxFileDescriptorCount();
            return (int) Math.max(64, Math.min(Integer.MAX_VALUE, limit / 2));
        }
        return 4096;
    }

    /** Called at the end of ServerInitializer.initChannel, for every accepted connection. */
    public static void configure(Channel channel) {
        ChannelPipeline p = channel.pipeline();
        p.addFirst("ts-limit", new Limit());
        p.addAfter("ts-limit", "ts-idle", new IdleStateHandler(IDLE_TIMEOUT_S, 0, 0, TimeUnit.SECONDS));
        if (p.get("aggregator") != null) {
            p.addAfter("aggregator", "ts-order", new InOrder());
            p.addAfter("ts-order", "ts-register", new RegistrationCheck());
        }
    }

    static FullHttpResponse plain(HttpResponseStatus status, String json) {
        FullHttpResponse r = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, status,
                Unpooled.copiedBuffer(json, StandardCharsets.UTF_8));
        r.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_JSON);
        r.headers().setInt(HttpHeaderNames.CONTENT_LENGTH, r.content().readableBytes());
        return r;
    }

    static String error(int code, String type, String message) {
        JsonObject o = new JsonObject();
        o.addProperty("code", code);
        o.addProperty("type", type);
        o.addProperty("message", message);
        return o.toString();
    }

    /** The connection cap: counts open connections, refuses one over the cap. */
    static final class Limit extends ChannelInboundHandlerAdapter {
        private boolean counted;

        @Override
        public void channelActive(ChannelHandlerContext ctx) throws Exception {
            if (OPEN.incrementAndGet() > MAX_CONNECTIONS) {
                OPEN.decrementAndGet();
                byte[] body = error(503, "ServiceUnavailableException",
                        "too many open connections (" + MAX_CONNECTIONS + ", TS_MAX_CONNECTIONS)")
                        .getBytes(StandardCharsets.UTF_8);
                String head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        + "Content-Length: " + body.length + "\r\nConnection: close\r\n\r\n";
                ctx.writeAndFlush(Unpooled.wrappedBuffer(head.getBytes(StandardCharsets.US_ASCII), body))
                        .addListener(ChannelFutureListener.CLOSE);
                return;
            }
            counted = true;
            super.channelActive(ctx);
        }

        @Override
        public void channelInactive(ChannelHandlerContext ctx) throws Exception {
            if (counted) {
                counted = false;
                OPEN.decrementAndGet();
            }
            super.channelInactive(ctx);
        }

        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            if (!counted) {  // refused: whatever it sends is dropped
                ReferenceCountUtil.release(msg);
                return;
            }
            ctx.fireChannelRead(msg);
        }
    }

    /** One request in flight per connection; answers leave in the order requests came. */
    static final class InOrder extends ChannelDuplexHandler {
        private final ArrayDeque<Object> waiting = new ArrayDeque<>();
        private boolean inFlight;

        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            if (msg instanceof HttpObject && ((HttpObject) msg).decoderResult().isFailure()) {
                String cause = String.valueOf(((HttpObject) msg).decoderResult().cause());
                ReferenceCountUtil.release(msg);
                FullHttpResponse r = plain(HttpResponseStatus.BAD_REQUEST,
                        error(400, "BadRequestException", "malformed HTTP request: " + cause));
                r.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.CLOSE);
                ctx.writeAndFlush(r).addListener(ChannelFutureListener.CLOSE);
                return;
            }
            if (!(msg instanceof FullHttpRequest)) {
                ctx.fireChannelRead(msg);
                return;
            }
            if (inFlight) {
                waiting.add(msg);
                if (waiting.size() >= MAX_WAITING) {
                    ctx.channel().config().setAutoRead(false);
                }
                return;
            }
            inFlight = true;
            ctx.fireChannelRead(msg);
        }

        @Override
        public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) {
            if (msg instanceof LastHttpContent && inFlight) {  // FullHttpResponse included
                promise = promise.unvoid();
                promise.addListener(f -> next(ctx));
            }
            ctx.write(msg, promise);
        }

        private void next(ChannelHandlerContext ctx) {
            inFlight = false;
            if (!ctx.channel().isActive()) {
                return;
            }
            Object msg = waiting.poll();
            if (waiting.size() < MAX_WAITING / 2 && !ctx.channel().config().isAutoRead()) {
                ctx.channel().config().setAutoRead(true);
                ctx.read();
            }
            if (msg != null) {
                inFlight = true;
                ctx.fireChannelRead(msg);
            }
        }

        @Override
        public void userEventTriggered(ChannelHandlerContext ctx, Object evt) throws Exception {
            if (evt instanceof IdleStateEvent) {
                if (!inFlight && waiting.isEmpty()) {
                    ctx.close();
                }
                return;
            }
            super.userEventTriggered(ctx, evt);
        }

        @Override
        public void channelInactive(ChannelHandlerContext ctx) throws Exception {
            Object msg;
            while ((msg = waiting.poll()) != null) {
                ReferenceCountUtil.release(msg);
            }
            super.channelInactive(ctx);
        }
    }

    /** Refuses registrations whose model name or url is not a plain name. */
    static final class RegistrationCheck extends ChannelInboundHandlerAdapter {
        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            if (msg instanceof FullHttpRequest) {
                FullHttpRequest req = (FullHttpRequest) msg;
                rawBodyForInference(req);
                if (req.method() == HttpMethod.GET && V2Routes.answer(ctx, req)) {
                    ReferenceCountUtil.release(msg);
                    return;
                }
                String problem = req.method() == HttpMethod.POST ? check(req) : null;
                if (problem != null) {
                    ReferenceCountUtil.release(msg);
                    FullHttpResponse r = plain(HttpResponseStatus.BAD_REQUEST,
                            error(400, "BadRequestException", problem));
                    r.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.KEEP_ALIVE);
                    ctx.writeAndFlush(r);
                    return;
                }
            }
            ctx.fireChannelRead(msg);
        }

        /**
         * curl --data-binary @photo.jpg without -H "Content-Type: ..." sends the image as
         * application/x-www-form-urlencoded; the frontend then parsed it as form fields and
         * answered 500 ErrorDataDecoderException (or handed the handler form fields). On the
         * inference routes such a body is the image itself: it goes on as
         * application/octet-stream.
         */
        static void rawBodyForInference(FullHttpRequest req) {
            String type = req.headers().get(HttpHeaderNames.CONTENT_TYPE);
            if (type == null || !type.toLowerCase().startsWith("application/x-www-form-urlencoded")) {
                return;
            }
            String path = new QueryStringDecoder(req.uri()).path();
            if (path.startsWith("/predictions/") || path.startsWith("/invocations")
                    || path.startsWith("/explanations/")
                    || (path.startsWith("/v1/models/") && (path.endsWith(":predict") || path.endsWith(":explain")))
                    || (path.startsWith("/v2/models/") && (path.endsWith("/infer") || path.endsWith("/explain")))) {
                req.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_OCTET_STREAM);
            }
        }

        static String check(FullHttpRequest req) {
            QueryStringDecoder query = new QueryStringDecoder(req.uri());
            String path = query.path();
            if (!"/models".equals(path) && !"/models/".equals(path)) {
                return null;
            }
            String url = first(query, "url");
            String name = first(query, "model_name");
            String type = req.headers().get(HttpHeaderNames.CONTENT_TYPE, "");
            if (type.toLowerCase().startsWith("application/json") && req.content().isReadable()) {
                try {
                    JsonElement body = JsonParser.parseString(req.content().toString(StandardCharsets.UTF_8));
                    if (body.isJsonObject()) {
                        JsonObject o = body.getAsJsonObject();
                        url = o.has("url") && !o.get("url").isJsonNull() ? o.get("url").getAsString() : url;
                        name = o.has("model_name") && !o.get("model_name").isJsonNull()
                                ? o.get("model_name").getAsString() : name;
                    }
                } catch (RuntimeException e) {
                    return "registration body is not valid JSON: " + e.getMessage();
                }
            }
            if (name != null && (!MODEL_NAME.matcher(name).matches() || name.contains(".."))) {
                return "model_name must be a plain name (letters, digits, '_', '-', '.', starting with "
                        + "a letter or digit, at most 128 characters, no \"..\"): " + printable(name);
            }
            if (url != null && (!ARCHIVE_NAME.matcher(url).matches() || url.contains(".."))) {
                return "url must be the file name of an archive in the model store (e.g. scenes.mar),"
                        + " not a path, a folder or a URL: " + printable(url);
            }
            return null;
        }

        static String first(QueryStringDecoder query, String key) {
            List<String> values = query.parameters().get(key);
            return values == null || values.isEmpty() ? null : values.get(0);
        }

        static String printable(String s) {
            StringBuilder b = new StringBuilder("\"");
            for (char c : s.substring(0, Math.min(s.length(), 80)).toCharArray()) {
                b.append(c < 0x20 || c == 0x7f ? String.format("\\u%04x", (int) c) : String.valueOf(c));
            }
            return b.append(s.length() > 80 ? "...\"" : "\"").toString();
        }
    }
}
