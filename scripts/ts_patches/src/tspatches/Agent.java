/*
 * Java agent patching TorchServe 0.12's frontend at class-load time (ASM). Six changes:
 *
 * 1. WorkerThread: scale-down drains the removed worker's batch in flight (GracefulScaleDown).
 *    run(): BatchAggregator.getRequest(String, WorkerState) -> GracefulScaleDown.getRequest(...)
 *    shutdown(): GracefulScaleDown.drain(this) at entry.
 * 2. HttpRequestHandler.channelRead0: a missing or wrong token (InvalidKeyException) is answered
 *    401 Unauthorized instead of 400 Bad Request, and registering a url that is a path rather than
 *    an archive name in the model store ("Model file already exists", 0.12's 500) 400 Bad Request
 *    (NettyUtils.sendError -> Agent.sendError, there and in ManagementRequestHandler.sendResponse,
 *    which answers registration failures).
 * 3. Model.pollBatch: a batch goes without waiting out maxBatchDelay when the model was idle or
 *    when the clients expected for it are in (IdleDispatch; the read of the maxBatchDelay field
 *    -> IdleDispatch.maxBatchDelay(this), queue.poll(timeout, unit) ->
 *    IdleDispatch.poll(queue, timeout, unit, this, jobsRepo)).
 * 4. ServerInitializer.initChannel: every connection gets a cap, an idle timeout, responses in
 *    request order and a registration check (Connections.configure, see Connections.java).
 * 5. NettyUtils.sendHttpResponse: a 4xx answer keeps the connection alive (0.12 closed it on
 *    every status >= 400, dropping requests pipelined behind it); 5xx still closes.
 * 6. GRPCJob.response: a handler's status >= 400 for a gRPC inference call is sent as a gRPC
 *    error status with our JSON message (GrpcErrors.respond, called at entry; 0.12 sent the
 *    error JSON as a successful prediction).
 *
 * Loaded with -javaagent:build/ts-patches.jar (serving/server.py sets JAVA_TOOL_OPTIONS).
 */
package tspatches;

import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.HttpResponseStatus;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;
import org.objectweb.asm.ClassReader;
import org.objectweb.asm.ClassVisitor;
import org.objectweb.asm.ClassWriter;
import org.objectweb.asm.MethodVisitor;
import org.objectweb.asm.Opcodes;
import org.pytorch.serve.archive.model.InvalidKeyException;
import org.pytorch.serve.http.InternalServerException;
import org.pytorch.serve.util.NettyUtils;

public final class Agent implements ClassFileTransformer {
    static final String WORKER = "org/pytorch/serve/wlm/WorkerThread";
    static final String HTTP = "org/pytorch/serve/http/HttpRequestHandler";
    static final String MODEL = "org/pytorch/serve/wlm/Model";
    static final String MANAGEMENT = "org/pytorch/serve/http/api/rest/ManagementRequestHandler";
    static final String INITIALIZER = "org/pytorch/serve/ServerInitializer";
    static final String DRAIN = "org/pytorch/serve/wlm/GracefulScaleDown";
    static final String IDLE = "org/pytorch/serve/wlm/IdleDispatch";
    static final String AGGREGATOR = "org/pytorch/serve/wlm/BatchAggregator";
    static final String DEQUE = "java/util/concurrent/LinkedBlockingDeque";
    static final String TIMED_POLL_DESC = "(JLjava/util/concurrent/TimeUnit;)Ljava/lang/Object;";
    static final String GET_REQUEST_DESC =
            "(Ljava/lang/String;Lorg/pytorch/serve/wlm/WorkerState;)"
                    + "Lorg/pytorch/serve/util/messages/BaseModelRequest;";
    static final String NETTY_UTILS = "org/pytorch/serve/util/NettyUtils";
    static final String GRPC_JOB = "org/pytorch/serve/job/GRPCJob";
    static final String RESPONSE_DESC =
            "([BLjava/lang/CharSequence;ILjava/lang/String;Ljava/util/Map;)V";
    static final String SEND_ERROR_DESC =
            "(Lio/netty/channel/ChannelHandlerContext;"
                    + "Lio/netty/handler/codec/http/HttpResponseStatus;Ljava/lang/Throwable;)V";

    public static void premain(String args, Instrumentation inst) {
        inst.addTransformer(new Agent());
    }

    /** A registration url that is not an archive file name in the model store. */
    public static final class BadModelUrlException extends Exception {
        BadModelUrlException(String message) {
            super(message);
        }
    }

    /**
     * NettyUtils.sendError, with InvalidKeyException answered 401 and a registration url that
     * points at the model store's own files (an absolute path, "/") answered 400: TorchServe
     * 0.12 "downloads" such a url onto the archive it names and fails with an
     * InternalServerException "Model file already exists".
     */
    public static void sendError(
            ChannelHandlerContext ctx, HttpResponseStatus status, Throwable t) {
        if (t instanceof InvalidKeyException) {
            status = HttpResponseStatus.UNAUTHORIZED;
        } else if (t instanceof InternalServerException
                && t.getMessage() != null
                && t.getMessage().startsWith("Model file already exists")) {
            status = HttpResponseStatus.BAD_REQUEST;
            t = new BadModelUrlException(
                    "url must be the file name of an archive in the model store (e.g."
                            + " scenes.mar), not a path or URL (" + t.getMessage() + ")");
        }
        NettyUtils.sendError(ctx, status, t);
    }

    @Override
    public byte[] transform(
            ClassLoader loader,
            String name,
            Class<?> redefined,
            ProtectionDomain domain,
            byte[] bytes) {
        if (!WORKER.equals(name) && !HTTP.equals(name) && !MODEL.equals(name)
                && !MANAGEMENT.equals(name) && !INITIALIZER.equals(name) && !NETTY_UTILS.equals(name)
                && !GRPC_JOB.equals(name)) {
            return null;
        }
        try {
            ClassReader reader = new ClassReader(bytes);
            ClassWriter writer = new ClassWriter(reader, ClassWriter.COMPUTE_MAXS);
            int[] patched = {0};
            reader.accept(
                    new ClassVisitor(Opcodes.ASM9, writer) {
                        @Override
                        public MethodVisitor visitMethod(
                                int access, String method, String desc, String sig, String[] exc) {
                            MethodVisitor mv = super.visitMethod(access, method, desc, sig, exc);
                            if (WORKER.equals(name) && method.equals("shutdown") && desc.equals("()V")) {
                                return new MethodVisitor(Opcodes.ASM9, mv) {
                                    @Override
                                    public void visitCode() {
                                        super.visitCode();
                                        super.visitVarInsn(Opcodes.ALOAD, 0);
                                        super.visitMethodInsn(Opcodes.INVOKESTATIC, DRAIN, "drain",
                                                "(L" + WORKER + ";)V", false);
                                        patched[0]++;
                                    }
                                };
                            }
                            if (WORKER.equals(name) && method.equals("run") && desc.equals("()V")) {
                                return new MethodVisitor(Opcodes.ASM9, mv) {
                                    @Override
                                    public void visitMethodInsn(int op, String owner, String m, String d, boolean itf) {
                                        if (op == Opcodes.INVOKEVIRTUAL && owner.equals(AGGREGATOR)
                                                && m.equals("getRequest") && d.equals(GET_REQUEST_DESC)) {
                                            super.visitMethodInsn(Opcodes.INVOKESTATIC, DRAIN, "getRequest",
                                                    "(L" + AGGREGATOR + ";" + d.substring(1), false);
                                            patched[0]++;
                                            return;
                                        }
                                        super.visitMethodInsn(op, owner, m, d, itf);
                                    }
                                };
                            }
                            if (MODEL.equals(name) && method.equals("pollBatch")
                                    && desc.equals("(Ljava/lang/String;JLjava/util/Map;)V")) {
                                return new MethodVisitor(Opcodes.ASM9, mv) {
                                    @Override
                                    public void visitFieldInsn(int op, String owner, String f, String d) {
                                        if (op == Opcodes.GETFIELD && owner.equals(MODEL)
                                                && f.equals("maxBatchDelay") && d.equals("I")) {
                                            // same stack effect: Model -> int
                                            super.visitMethodInsn(Opcodes.INVOKESTATIC, IDLE, "maxBatchDelay",
                                                    "(L" + MODEL + ";)I", false);
                                            patched[0]++;
                                            return;
                                        }
                                        super.visitFieldInsn(op, owner, f, d);
                                    }

                                    @Override
                                    public void visitMethodInsn(int op, String owner, String m, String d, boolean itf) {
                                        if (op == Opcodes.INVOKEVIRTUAL && owner.equals(DEQUE)
                                                && m.equals("poll") && d.equals(TIMED_POLL_DESC)) {
                                            // deque, timeout, unit -> + this, jobsRepo (parameter slot 4)
                                            super.visitVarInsn(Opcodes.ALOAD, 0);
                                            super.visitVarInsn(Opcodes.ALOAD, 4);
                                            super.visitMethodInsn(Opcodes.INVOKESTATIC, IDLE, "poll",
                                                    "(L" + DEQUE + ";JLjava/util/concurrent/TimeUnit;L"
                                                            + MODEL + ";Ljava/util/Map;)Ljava/lang/Object;", false);
                                            patched[0]++;
                                            return;
                                        }
                                        super.visitMethodInsn(op, owner, m, d, itf);
                                    }
                                };
                            }
                            if (INITIALIZER.equals(name) && method.equals("initChannel")
                                    && desc.equals("(Lio/netty/channel/Channel;)V")) {
                                return new MethodVisitor(Opcodes.ASM9, mv) {
                                    @Override
                                    public void visitInsn(int op) {
                                        if (op == Opcodes.RETURN) {  // the pipeline is complete
                                            super.visitVarInsn(Opcodes.ALOAD, 1);
                                            super.visitMethodInsn(Opcodes.INVOKESTATIC, "tspatches/Connections",
                                                    "configure", "(Lio/netty/channel/Channel;)V", false);
                                            patched[0]++;
                                        }
                                        super.visitInsn(op);
                                    }
                                };
                            }
                            if (GRPC_JOB.equals(name) && method.equals("response")
                                    && desc.equals(RESPONSE_DESC)) {
                                // at entry: if (GrpcErrors.respond(this, body, statusCode)) return;
                                return new MethodVisitor(Opcodes.ASM9, mv) {
                                    @Override
                                    public void visitCode() {
                                        super.visitCode();
                                        org.objectweb.asm.Label upstream = new org.objectweb.asm.Label();
                                        super.visitVarInsn(Opcodes.ALOAD, 0);
                                        super.visitVarInsn(Opcodes.ALOAD, 1);
                                        super.visitVarInsn(Opcodes.ILOAD, 3);
                                        super.visitMethodInsn(Opcodes.INVOKESTATIC, "tspatches/GrpcErrors",
                                                "respond", "(Lorg/pytorch/serve/job/Job;[BI)Z", false);
                                        super.visitJumpInsn(Opcodes.IFEQ, upstream);
                                        super.visitInsn(Opcodes.RETURN);
                                        super.visitLabel(upstream);
                                        // the method's first frame: its arguments, an empty stack
                                        super.visitFrame(Opcodes.F_SAME, 0, null, 0, null);
                                        patched[0]++;
                                    }
                                };
                            }
                            if (NETTY_UTILS.equals(name) && method.equals("sendHttpResponse")) {
                                // `if (!keepAlive || code >= 400) close` -> `... code >= 500`: a client
                                // error leaves the connection (and requests pipelined on it) alive
                                return new MethodVisitor(Opcodes.ASM9, mv) {
                                    int state; // 1: ILOAD 2 seen, 2: + IFEQ, 3: + ILOAD 7

                                    @Override
                                    public void visitVarInsn(int op, int var) {
                                        state = op == Opcodes.ILOAD && var == 2 ? 1
                                                : state == 2 && op == Opcodes.ILOAD && var == 7 ? 3 : 0;
                                        super.visitVarInsn(op, var);
                                    }

                                    @Override
                                    public void visitJumpInsn(int op, org.objectweb.asm.Label label) {
                                        state = state == 1 && op == Opcodes.IFEQ ? 2 : 0;
                                        super.visitJumpInsn(op, label);
                                    }

                                    @Override
                                    public void visitIntInsn(int op, int operand) {
                                        if (state == 3 && op == Opcodes.SIPUSH && operand == 400) {
                                            operand = 500;
                                            patched[0]++;
                                        }
                                        state = 0;
                                        super.visitIntInsn(op, operand);
                                    }

                                    @Override
                                    public void visitInsn(int op) {
                                        state = 0;
                                        super.visitInsn(op);
                                    }

                                    @Override
                                    public void visitMethodInsn(int op, String owner, String m, String d, boolean itf) {
                                        state = 0;
                                        super.visitMethodInsn(op, owner, m, d, itf);
                                    }

                                    @Override
                                    public void visitFieldInsn(int op, String owner, String f, String d) {
                                        state = 0;
                                        super.visitFieldInsn(op, owner, f, d);
                                    }
                                };
                            }
                            if ((HTTP.equals(name) && method.equals("channelRead0"))
                                    || (MANAGEMENT.equals(name) && method.equals("sendResponse"))) {
                                return new MethodVisitor(Opcodes.ASM9, mv) {
                                    @Override
                                    public void visitMethodInsn(int op, String owner, String m, String d, boolean itf) {
                                        if (op == Opcodes.INVOKESTATIC && owner.equals(NETTY_UTILS)
                                                && m.equals("sendError") && d.equals(SEND_ERROR_DESC)) {
                                            super.visitMethodInsn(Opcodes.INVOKESTATIC, "tspatches/Agent",
                                                    "sendError", d, false);
                                            patched[0]++;
                                            return;
                                        }
                                        super.visitMethodInsn(op, owner, m, d, itf);
                                    }
                                };
                            }
                            return mv;
                        }
                    },
                    0);
            // Model.pollBatch: the delay read and its three timed polls
            int expected = WORKER.equals(name) ? 2 : MODEL.equals(name) ? 4 : 1;
            if (patched[0] < expected) {
                System.err.println("ts-patches: " + name + " did not match (TorchServe version?); "
                        + "left unpatched");
                return null;
            }
            System.err.println("ts-patches: patched " + name + " (" + patched[0] + " sites)");
            return writer.toByteArray();
        } catch (Throwable e) {
            System.err.println("ts-patches: failed to patch " + name + ": " + e);
            return null;
        }
    }
}
