/*
 * The Open Inference Protocol's (KServe v2) health and model routes, which TorchServe 0.12 does
 * not serve over HTTP (GET /v2/models/{m}, /v2/models/{m}/ready) or serves only with
 * ts_open_inference_protocol=true and behind the token (/v2/health/*), where a Kubernetes probe,
 * which cannot know the key generated at start, never gets through:
 *
 *   GET /v2/health/live                      200 {"live": true}: the frontend answers
 *   GET /v2/health/ready                     200 {"ready": true} when every registered model's
 *                                            default version has a healthy worker, else 503
 *   GET /v2/models/{m}[/versions/{v}]/ready  200 {"name", "ready": true}, 503 not yet, 404 unknown
 *   GET /v2/models/{m}[/versions/{v}]        model metadata (versions, the BYTES input, the
 *                                            labels / probabilities / indices outputs), with the
 *                                            inference key when token authorization is on
 *   GET /v2                                  server metadata, with the inference key
 *
 * The probes (live, ready) carry no data and stay open; the metadata is behind the key like
 * every other inference route.
 */
package tspatches;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.util.Map;
import java.util.TreeSet;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.util.TokenAuthorization;

final class V2Routes {
    private V2Routes() {}

    /** Answers the request if it is one of the routes above; false: not ours, pass it on. */
    static boolean answer(ChannelHandlerContext ctx, FullHttpRequest req) {
        String path = new QueryStringDecoder(req.uri()).path();
        if (!path.equals("/v2") && !path.startsWith("/v2/")) {
            return false;
        }
        String[] parts = path.substring(1).split("/");  // v2, health|models, ...
        if (parts.length == 3 && parts[1].equals("health") && parts[2].equals("live")) {
            JsonObject o = new JsonObject();
            o.addProperty("live", true);
            send(ctx, req, HttpResponseStatus.OK, o);
            return true;
        }
        if (parts.length == 3 && parts[1].equals("health") && parts[2].equals("ready")) {
            boolean ready = true;
            for (Model m : ModelManager.getInstance().getDefaultModels().values()) {
                ready &= healthy(m);
            }
            JsonObject o = new JsonObject();
            o.addProperty("ready", ready);
            send(ctx, req, ready ? HttpResponseStatus.OK : HttpResponseStatus.SERVICE_UNAVAILABLE, o);
            return true;
        }
        boolean ready = parts.length >= 3 && parts[parts.length - 1].equals("ready");
        int n = ready ? parts.length - 1 : parts.length;
        boolean model = parts.length >= 3 && parts[1].equals("models")
                && (n == 3 || (n == 5 && parts[3].equals("versions")));
        boolean server = parts.length == 1;
        if (!model && !server) {
            return false;  // /v2/models/{m}/infer and the rest: TorchServe's
        }
        if (!ready && !authorized(req)) {
            send(ctx, req, HttpResponseStatus.UNAUTHORIZED, error(
                    "Token Authorization failed. Token either incorrect, expired, or not provided correctly"));
            return true;
        }
        if (server) {
            JsonObject o = new JsonObject();
            o.addProperty("name", "torchserve");
            o.addProperty("version", "0.12.0");
            o.add("extensions", new JsonArray());
            send(ctx, req, HttpResponseStatus.OK, o);
            return true;
        }
        String name = parts[2];
        String version = n == 5 ? parts[4] : null;
        Model m;
        try {
            m = ModelManager.getInstance().getModel(name, version);
        } catch (Exception e) {
            m = null;
        }
        if (m == null) {
            send(ctx, req, HttpResponseStatus.NOT_FOUND, error("model " + name
                    + (version == null ? "" : " version " + version) + " not found"));
            return true;
        }
        if (ready) {
            boolean ok = healthy(m);
            JsonObject o = new JsonObject();
            o.addProperty("name", name);
            o.addProperty("ready", ok);
            send(ctx, req, ok ? HttpResponseStatus.OK : HttpResponseStatus.SERVICE_UNAVAILABLE, o);
            return true;
        }
        JsonObject o = new JsonObject();
        o.addProperty("name", name);
        JsonArray versions = new JsonArray();
        try {
            TreeSet<String> all = new TreeSet<>();
            for (Map.Entry<String, Model> e : ModelManager.getInstance().getAllModelVersions(name)) {
                all.add(e.getKey());
            }
            all.forEach(versions::add);
        } catch (Exception e) {
            versions.add(m.getVersion());
        }
        o.add("versions", versions);
        o.addProperty("platform", "pytorch_torchserve");
        JsonArray inputs = new JsonArray();
        inputs.add(tensor("images", "BYTES", 1));
        o.add("inputs", inputs);
        JsonArray outputs = new JsonArray();
        outputs.add(tensor("labels", "BYTES", 2));
        outputs.add(tensor("probabilities", "FP32", 2));
        outputs.add(tensor("indices", "INT64", 2));
        o.add("outputs", outputs);
        send(ctx, req, HttpResponseStatus.OK, o);
        return true;
    }

    static boolean healthy(Model m) {
        return ModelManager.getInstance().getNumHealthyWorkers(m.getModelVersionName()) > 0;
    }

    static boolean authorized(FullHttpRequest req) {
        if (!TokenAuthorization.isEnabled()) {
            return true;
        }
        String header = req.headers().get(HttpHeaderNames.AUTHORIZATION);
        if (header == null) {
            return false;
        }
        String token = TokenAuthorization.parseTokenFromBearerTokenHeader(header);
        return token != null && TokenAuthorization.checkTokenAuthorization(
                token, TokenAuthorization.TokenType.INFERENCE);
    }

    static JsonObject tensor(String name, String datatype, int dims) {
        JsonObject t = new JsonObject();
        t.addProperty("name", name);
        t.addProperty("datatype", datatype);
        JsonArray shape = new JsonArray();
        for (int i = 0; i < dims; i++) {
            shape.add(-1);
        }
        t.add("shape", shape);
        return t;
    }

    static JsonObject error(String message) {
        JsonObject o = new JsonObject();
        o.addProperty("error", message);
        return o;
    }

    static void send(ChannelHandlerContext ctx, FullHttpRequest req, HttpResponseStatus status, JsonObject body) {
        FullHttpResponse r = Connections.plain(status, body.toString());
        if (HttpUtil.isKeepAlive(req)) {
            r.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.KEEP_ALIVE);
            ctx.writeAndFlush(r);
        } else {
            r.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.CLOSE);
            ctx.writeAndFlush(r).addListener(ChannelFutureListener.CLOSE);
        }
    }
}
