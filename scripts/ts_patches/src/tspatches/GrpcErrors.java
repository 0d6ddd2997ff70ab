/*
 * A handler's 4xx/5xx answer to a gRPC inference call becomes a gRPC error status (our code,
 * woven in by tspatches.Agent at the entry of GRPCJob.response).
 *
 * TorchServe 0.12's GRPCJob.response ignores the status the handler set for the request
 * (context.set_response_status): our 400 "cannot identify image" reached a gRPC client as a
 * successful Predictions call whose prediction was the error JSON; the KServe v2 gRPC route
 * (OIPPREDICT, not enabled in our config.properties, so untested) parses the answer as an
 * inference response, which an error JSON is not. With the patch a status >= 400
 * is sent as the gRPC code closest to it, with our JSON message as the status description; the
 * other requests of the batch are answered as before.
 *
 * HTTP to gRPC codes as google.rpc.Code documents them (code.proto), with 413 and 429 as
 * RESOURCE_EXHAUSTED (what gRPC itself answers for a message over its size limit) and 415 and 422
 * as INVALID_ARGUMENT; any other 4xx is INVALID_ARGUMENT and any other 5xx INTERNAL.
 */
package tspatches;

import io.grpc.Status;
import io.grpc.stub.ServerCallStreamObserver;
import io.grpc.stub.StreamObserver;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import org.pytorch.serve.job.GRPCJob;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.messages.WorkerCommands;

public final class GrpcErrors {
    private static final Field PREDICTION = field("predictionResponseObserver");
    private static final Field OPEN_INFERENCE = field("modelInferResponseObserver");

    private GrpcErrors() {}

    private static Field field(String name) {
        try {
            Field f = GRPCJob.class.getDeclaredField(name);
            f.setAccessible(true);
            return f;
        } catch (ReflectiveOperationException | RuntimeException e) {
            System.err.println("ts-patches: GRPCJob." + name + " not found (" + e + ")");
            return null;
        }
    }

    /** The gRPC code for an HTTP status >= 400. */
    static Status.Code code(int http) {
        switch (http) {
            case 401: return Status.Code.UNAUTHENTICATED;
            case 403: return Status.Code.PERMISSION_DENIED;
            case 404: return Status.Code.NOT_FOUND;
            case 409: return Status.Code.ABORTED;
            case 413:
            case 429: return Status.Code.RESOURCE_EXHAUSTED;
            case 499: return Status.Code.CANCELLED;
            case 501: return Status.Code.UNIMPLEMENTED;
            case 503: return Status.Code.UNAVAILABLE;
            case 504: return Status.Code.DEADLINE_EXCEEDED;
            default: return http < 500 ? Status.Code.INVALID_ARGUMENT : Status.Code.INTERNAL;
        }
    }

    /**
     * Called first in GRPCJob.response(body, contentType, statusCode, ...).
     *
     * @return true when the answer was sent here as an error status (response then returns);
     *     false for a status below 400, a command other than an inference one, or a missing
     *     field: upstream's code runs
     */
    public static boolean respond(Job job, byte[] body, int statusCode) {
        if (statusCode < 400 || !(job instanceof GRPCJob)) {
            return false;
        }
        WorkerCommands cmd = job.getCmd();
        Field f = cmd == WorkerCommands.OIPPREDICT ? OPEN_INFERENCE
                : cmd == WorkerCommands.PREDICT || cmd == WorkerCommands.STREAMPREDICT
                        || cmd == WorkerCommands.STREAMPREDICT2 ? PREDICTION : null;
        if (f == null) {
            return false;
        }
        try {
            StreamObserver<?> observer = (StreamObserver<?>) f.get(job);
            if (observer == null) {
                return false;
            }
            if (observer instanceof ServerCallStreamObserver
                    && ((ServerCallStreamObserver<?>) observer).isCancelled()) {
                return true; // the client is gone: nothing to send (upstream returns too)
            }
            String message = body == null ? "" : new String(body, StandardCharsets.UTF_8);
            observer.onError(Status.fromCode(code(statusCode)).withDescription(message)
                    .asRuntimeException());
            return true;
        } catch (IllegalAccessException | RuntimeException e) {
            System.err.println("ts-patches: gRPC error answer failed (" + e + ")");
            return false;
        }
    }
}
