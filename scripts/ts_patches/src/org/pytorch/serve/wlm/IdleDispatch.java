/*
 * Batch dispatch for TorchServe 0.12's dynamic batching (our code, woven in by tspatches.Agent).
 *
 * Upstream Model.pollBatch takes the first job, then waits up to maxBatchDelay ms for more,
 * until batchSize jobs are in. When fewer clients than batchSize are sending, the batch can
 * never fill, so every batch pays the whole delay: a lone client waits maxBatchDelay for a
 * batch of one, four clients wait it for a batch of four.
 *
 * With the agent, two rules shorten that wait; neither makes a batch wait longer than upstream:
 *   1. idle (maxBatchDelay(model), the delay read at the start of pollBatch): when the model's
 *      last batch held one job (or none was dispatched yet) and at most one job is waiting,
 *      the delay is 0 ms, so the first job goes out with whatever is already queued. "At most
 *      one", not "none": the read happens when the worker comes back for its next batch, and a
 *      client that sends its next request as soon as it reads the previous answer is often
 *      quicker than that.
 *   2. cohort (poll(...), each wait for the batch's next job): the clients expected for this
 *      batch are the connections of the model's last batch that are still open, together with
 *      the connections of the jobs taken and queued (a client keeps its keep-alive connection,
 *      and the frontend patch passes on one request per connection at a time). Once the batch
 *      holds as many jobs as that, it takes what is queued without waiting and goes. Clients in
 *      a closed loop (each sends its next request when it has its answer) are all back after a
 *      round trip, not after maxBatchDelay. A client that keeps its connection but pauses leaves
 *      the count above what arrives, and the batch waits as upstream does; so does a batch with
 *      a job that is not an HTTP one (gRPC: no connection to count).
 * Under load the batches fill and nothing changes. The environment variable TS_IDLE_DISPATCH of
 * the frontend selects: "0" upstream, "idle" rule 1 alone, anything else (default) both.
 */
package org.pytorch.serve.wlm;

import io.netty.channel.Channel;
import io.netty.channel.ChannelHandlerContext;
import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.WeakHashMap;
import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.TimeUnit;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.job.RestJob;

public final class IdleDispatch {
    static final String MODE = System.getenv().getOrDefault("TS_IDLE_DISPATCH", "1");
    static final boolean ENABLED = !"0".equals(MODE);
    /** RestJob's private connection (0.12 has no getter); null: rule 2 stays off. */
    private static final Field REST_CTX = restCtx();
    static final boolean COHORT = ENABLED && !"idle".equals(MODE) && REST_CTX != null;
    /** Jobs in the last batch each model dispatched (weak keys: unregistered models go). */
    private static final Map<Model, Integer> LAST_BATCH =
            Collections.synchronizedMap(new WeakHashMap<>());
    /** The connections of those jobs. */
    private static final Map<Model, List<Channel>> LAST_CLIENTS =
            Collections.synchronizedMap(new WeakHashMap<>());

    private IdleDispatch() {}

    private static Field restCtx() {
        try {
            Field f = RestJob.class.getDeclaredField("ctx");
            f.setAccessible(true);
            return f;
        } catch (ReflectiveOperationException | RuntimeException e) {
            System.err.println("ts-patches: RestJob.ctx not found (" + e + "); cohort dispatch off");
            return null;
        }
    }

    /** Replaces pollBatch's read of Model.maxBatchDelay (ms): rule 1. */
    public static int maxBatchDelay(Model model) {
        int configured = model.getMaxBatchDelay();
        if (!ENABLED) {
            return configured;
        }
        Integer last = LAST_BATCH.get(model);
        boolean idle = (last == null || last <= 1) && model.getPendingRequestsInJobQueue() <= 1;
        return idle ? 0 : configured;
    }

    /**
     * Replaces pollBatch's queue.poll(timeout, unit) calls: rule 2. With an empty batch (the
     * wait for the first job, or the worker's own command queue) it is upstream's poll.
     *
     * @param queue the model's job queue
     * @param timeout what is left of maxBatchDelay, in unit
     * @param model the model whose batch is collected (pollBatch holds its lock)
     * @param batch the jobs taken so far
     * @return the next job, or null: the batch goes
     */
    public static Object poll(LinkedBlockingDeque<Job> queue, long timeout, TimeUnit unit,
                              Model model, Map<String, Job> batch) throws InterruptedException {
        if (COHORT && !batch.isEmpty() && timeout > 0
                && batch.size() >= expected(model, batch, queue)) {
            return queue.poll();
        }
        return queue.poll(timeout, unit);
    }

    /** Distinct clients expected in this batch, at most batchSize (batchSize when a job has
     *  no HTTP connection). */
    static int expected(Model model, Map<String, Job> batch, Collection<Job> queue) {
        int full = Math.max(model.getBatchSize(), 1);
        Set<Channel> clients = new HashSet<>();
        List<Channel> last = LAST_CLIENTS.get(model);
        if (last != null) {
            for (Channel c : last) {
                if (c.isActive()) {
                    clients.add(c);
                }
            }
        }
        for (Job j : batch.values()) {
            Channel c = channel(j);
            if (c == null) {
                return full; // not an HTTP job (gRPC): who comes back is unknown, wait as upstream
            }
            clients.add(c);
        }
        for (Job j : queue) { // a long queue: stop counting at a full batch
            if (clients.size() >= full) {
                break;
            }
            Channel c = channel(j);
            if (c == null) {
                return full;
            }
            clients.add(c);
        }
        return Math.min(clients.size(), full);
    }

    private static Channel channel(Job job) {
        if (REST_CTX == null || !(job instanceof RestJob)) {
            return null;
        }
        try {
            ChannelHandlerContext ctx = (ChannelHandlerContext) REST_CTX.get(job);
            return ctx == null ? null : ctx.channel();
        } catch (IllegalAccessException | RuntimeException e) {
            return null;
        }
    }

    /** Records the batch a worker of model just took. */
    static void dispatched(Model model, Collection<Job> jobs) {
        if (!ENABLED || jobs.isEmpty()) {
            return;
        }
        LAST_BATCH.put(model, jobs.size());
        if (COHORT) {
            List<Channel> clients = new ArrayList<>(jobs.size());
            for (Job j : jobs) {
                Channel c = channel(j);
                if (c != null) {
                    clients.add(c);
                }
            }
            LAST_CLIENTS.put(model, clients);
        }
    }
}
